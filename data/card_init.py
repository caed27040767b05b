"""``vitadapter data init``: a folder of images and label maps becomes a first dataset card.

:func:`scan_folder` recognises three layouts (ADE20K's ``images/{training,validation}`` + ``annotations/...``,
mmsegmentation's ``img_dir/{train,val}`` + ``ann_dir/...``, and one ``images/`` folder beside ``labels/`` or
``masks/`` with a split to make), pairs the files, reads every label map once (Pillow, values unchanged) and
every image's size (its header), and guesses the label rule from the values it saw, saying why
(:class:`CardDraft`). :func:`card_text` writes the card with what was found as comments: pairs per split, files
without a partner, label modes, size mismatches, the values with their pixel share, and placeholder class names
for the user to edit.
"""

from __future__ import annotations

import logging
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image
from tqdm import tqdm

from data.card_readers import SHOWN_NAMES, sample_key
from data.cards import IMAGE_SUFFIXES
from data.catalog import IGNORE_INDEX, MAX_CLASSES

log = logging.getLogger(__name__)

IMAGE_FOLDERS = ("images", "img_dir", "imgs", "JPEGImages", "image")
LABEL_FOLDERS = ("annotations", "ann_dir", "labels", "masks", "SegmentationClass", "label", "mask", "anns")
SPLIT_FOLDERS = {"train": ("training", "train"), "val": ("validation", "val", "valid")}
LABEL_FILE_SUFFIXES = (".png", ".bmp", ".tif", ".tiff")
# a value covering less than this share of all labelled pixels, outside the run of values from 0, is a stray
STRAY_SHARE = 0.01
# at most this many distinct colours are mapped in a guessed RGB map
MAX_COLOURS = MAX_CLASSES
DEFAULT_VAL_FRACTION = 0.2


@dataclass
class SplitFound:
    """One split: the image and label folders, the paired stems and the files without a partner."""

    images: Path
    labels: Path
    pairs: list[str] = field(default_factory=list)
    images_only: list[str] = field(default_factory=list)
    labels_only: list[str] = field(default_factory=list)
    listed: list[str] | None = None  # a split made by init: the stems of its list file


@dataclass
class CardDraft:
    """What :func:`scan_folder` found and guessed."""

    root: Path
    layout: str
    image_suffix: str
    label_suffix: str
    splits: dict[str, SplitFound]
    modes: Counter = field(default_factory=Counter)
    values: Counter = field(default_factory=Counter)
    value_files: dict[Any, list[str]] = field(default_factory=dict)
    size_mismatches: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    rgb: bool = False
    labels: Any = "train_ids"
    classes: list[str] = field(default_factory=list)
    ignore_index: Any = IGNORE_INDEX
    reasons: list[str] = field(default_factory=list)

    def summary_lines(self) -> list[str]:
        """What was found, for a person (the command prints these)."""
        lines = [
            f"{self.root}: {self.layout} layout; images *{self.image_suffix}, label maps *{self.label_suffix}"
        ]
        for split, found in self.splits.items():
            made = " (split made by init)" if found.listed is not None else ""
            lines.append(f"  {split}: {len(found.pairs)} pairs{made}")
            for what, partner, names in (
                ("image", "a label map", found.images_only),
                ("label map", "an image", found.labels_only),
            ):
                if names:
                    plural = "s" if len(names) > 1 else ""
                    lines.append(f"    {len(names)} {what}{plural} without {partner}: {_first(names)}")
        lines.append("  label modes: " + ", ".join(f"{m} {n}" for m, n in sorted(self.modes.items())))
        if self.size_mismatches:
            lines.append(
                f"  {len(self.size_mismatches)} label maps of another size than their image: {_first(self.size_mismatches)}"
            )
        if self.unreadable:
            lines.append(f"  {len(self.unreadable)} unreadable files: {_first(self.unreadable)}")
        lines.append("  values: " + self.values_text())
        lines += [f"  {reason}" for reason in self.reasons]
        return lines

    def values_text(self) -> str:
        total = sum(self.values.values()) or 1
        parts = []
        for value, count in sorted(self.values.items()):
            shown = ",".join(map(str, value)) if self.rgb else str(value)
            files = self.value_files.get(value, [])
            where = (
                f" in {len(files)} file{'s' if len(files) != 1 else ''}" if len(files) <= SHOWN_NAMES else ""
            )
            parts.append(f"{shown}: {100 * count / total:.2f}%{where}")
        return ", ".join(parts) or "none"


def _first(names: list[str]) -> str:
    shown = ", ".join(names[:SHOWN_NAMES])
    return shown + (f", ... ({len(names) - SHOWN_NAMES} more)" if len(names) > SHOWN_NAMES else "")


def _child(folder: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        for candidate in (folder / name, folder / name.lower()):
            if candidate.is_dir():
                return candidate
    return None


def _files(folder: Path) -> list[str]:
    return sorted(
        (Path(d).relative_to(folder) / f).as_posix()
        for d, _, files in os.walk(folder)
        for f in files
        if not f.startswith(".")
    )


def _common_suffix(names: list[str], choices: tuple[str, ...]) -> str | None:
    counts = Counter(next((s for s in choices if n.lower().endswith(s)), None) for n in names)
    counts.pop(None, None)
    return counts.most_common(1)[0][0] if counts else None


def _label_suffix(labels: list[str], image_stems: set[str], extension: str) -> str:
    """The label maps' suffix: their extension, or a common ending before it (``_mask.png``) when the stems
    only match the images' with it."""
    plain = {n[: -len(extension)] for n in labels if n.lower().endswith(extension)}
    if len(plain & image_stems) >= len(plain) / 2:
        return extension
    endings = Counter(
        n[len(s) :].lower() for n in labels for s in (n.rsplit("_", 1)[0],) if s in image_stems and "_" in n
    )
    return endings.most_common(1)[0][0] if endings else extension


def _strip(name: str, suffix: str) -> str | None:
    return name[: -len(suffix)] if name.lower().endswith(suffix) else None


def _pair(images: Path, labels: Path, image_suffix: str, label_suffix: str) -> SplitFound:
    same = images.resolve() == labels.resolve()
    image_stems = {
        s
        for n in _files(images)
        if not (same and n.lower().endswith(label_suffix))
        if (s := _strip(n, image_suffix))
    }
    label_stems = {s for n in _files(labels) if (s := _strip(n, label_suffix))}
    return SplitFound(
        images,
        labels,
        pairs=sorted(image_stems & label_stems),
        images_only=sorted(f"{s}{image_suffix}" for s in image_stems - label_stems),
        labels_only=sorted(f"{s}{label_suffix}" for s in label_stems - image_stems),
    )


def _find_layout(root: Path) -> tuple[str, Path, Path, dict[str, tuple[Path, Path]] | None]:
    images, labels = _child(root, IMAGE_FOLDERS), _child(root, LABEL_FOLDERS)
    if images is None or labels is None:
        raise FileNotFoundError(
            f"{root}: no image and label folders found (expected images/ + annotations/ (ADE20K), img_dir/ + "
            "ann_dir/ (mmsegmentation), or images/ + labels/ or masks/); write the card by hand (README 'Your own data')"
        )
    splits: dict[str, tuple[Path, Path]] = {}
    for split, names in SPLIT_FOLDERS.items():
        image_split, label_split = _child(images, names), _child(labels, names)
        if image_split is not None and label_split is not None:
            splits[split] = (image_split, label_split)
    if len(splits) == 2:
        layout = "ADE20K" if splits["train"][0].name == "training" else "mmsegmentation"
        return layout, images, labels, splits
    return "flat (one folder of images, one of label maps)", images, labels, None


def _read_label(path: Path) -> tuple[np.ndarray, str]:
    with Image.open(path) as image:
        image.load()
        mode = image.mode
        if mode in ("RGB", "RGBA"):
            return np.array(image.convert("RGB")), mode
        array = np.array(image)
    if array.ndim == 3:
        array = array[..., 0]
    return array.astype(np.int64), mode


def _image_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


def scan_folder(
    root: str | Path, *, val_fraction: float = DEFAULT_VAL_FRACTION, seed: int = 0, progress: bool = True
) -> CardDraft:
    """Pair the images and label maps under ``root``, read every label map once, and guess the card.

    Args:
        root: the dataset folder.
        val_fraction: the share of pairs that go to ``val`` when the layout has no split (at least one pair).
        seed: the shuffle that makes that split (deterministic).
        progress: a progress bar over the label maps.

    Raises:
        FileNotFoundError: no known layout under ``root``.
        ValueError: no image-label pair at all.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}")
    layout, images, labels, split_folders = _find_layout(root)
    image_names = _files(images)
    label_names = _files(labels)
    image_suffix = _common_suffix(image_names, IMAGE_SUFFIXES)
    extension = _common_suffix(label_names, LABEL_FILE_SUFFIXES)
    if image_suffix is None or extension is None:
        raise ValueError(
            f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) or no label maps ({', '.join(LABEL_FILE_SUFFIXES)}) found"
        )
    stems = {
        n[: -len(image_suffix)].rsplit("/", 1)[-1] for n in image_names if n.lower().endswith(image_suffix)
    }
    label_suffix = _label_suffix([n.rsplit("/", 1)[-1] for n in label_names], stems, extension)
    if split_folders is not None:
        splits = {s: _pair(i, lab, image_suffix, label_suffix) for s, (i, lab) in split_folders.items()}
    else:
        whole = _pair(images, labels, image_suffix, label_suffix)
        if len(whole.pairs) < 2:
            raise ValueError(
                f"{root}: {len(whole.pairs)} image-label pairs: too few to make a train and a val split"
            )
        order = list(whole.pairs)
        random.Random(seed).shuffle(order)
        count = max(1, round(len(order) * val_fraction))
        val, train = sorted(order[:count]), sorted(order[count:])
        splits = {
            "train": SplitFound(images, labels, train, whole.images_only, whole.labels_only, listed=train),
            "val": SplitFound(images, labels, val, [], [], listed=val),
        }
    if not any(found.pairs for found in splits.values()):
        raise ValueError(
            f"{root}: no image has a label map of the same name (images *{image_suffix}, labels *{label_suffix})"
        )
    draft = CardDraft(root, layout, image_suffix, label_suffix, splits)
    _read_all(draft, progress=progress)
    _guess(draft)
    return draft


def _read_all(draft: CardDraft, *, progress: bool) -> None:
    jobs = [(found, stem) for found in draft.splits.values() for stem in found.pairs]
    rgb_seen = False
    for found, stem in tqdm(jobs, desc="label maps", unit="file", disable=not progress):
        label_path = found.labels / f"{stem}{draft.label_suffix}"
        name = label_path.relative_to(draft.root).as_posix()
        try:
            array, mode = _read_label(label_path)
            width, height = _image_size(found.images / f"{stem}{draft.image_suffix}")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            draft.unreadable.append(f"{name} ({err})")
            continue
        draft.modes[mode] += 1
        if array.shape[:2] != (height, width):
            draft.size_mismatches.append(name)
        if array.ndim == 3:
            rgb_seen = True
            codes = (
                (array[..., 0].astype(np.uint32) << 16)
                | (array[..., 1].astype(np.uint32) << 8)
                | array[..., 2]
            )
            values, counts = np.unique(codes, return_counts=True)
            keys = [(int(v) >> 16, (int(v) >> 8) & 255, int(v) & 255) for v in values]
        else:
            counts_all = np.bincount(array.ravel())
            values = np.flatnonzero(counts_all)
            keys, counts = [int(v) for v in values], counts_all[values]
        for key, count in zip(keys, counts.tolist(), strict=True):
            draft.values[key] += count
            files = draft.value_files.setdefault(key, [])
            if len(files) <= SHOWN_NAMES:
                files.append(name)
    if rgb_seen and any(not isinstance(k, tuple) for k in draft.values):
        draft.reasons.append("some label maps are RGB and some single-channel: make them one kind")
        draft.values = Counter({k: v for k, v in draft.values.items() if isinstance(k, tuple)})
    draft.rgb = rgb_seen


def _guess(draft: CardDraft) -> None:
    """``labels``, ``classes`` and ``ignore_index`` from the values seen, with the reasons."""
    total = sum(draft.values.values()) or 1
    if draft.rgb:
        colours = sorted(draft.values)
        kept = sorted(sorted(colours, key=lambda c: -draft.values[c])[:MAX_COLOURS])
        draft.labels = {",".join(map(str, c)): f"class_{i}" for i, c in enumerate(kept)}
        draft.classes = [f"class_{i}" for i in range(len(kept))]
        draft.ignore_index = []
        draft.reasons.append(
            f"RGB label maps: {len(colours)} colours; each becomes a class (name them; map a colour to ignore to "
            "leave it out of loss and metric)"
        )
        if len(colours) > 64:
            draft.reasons.append(
                f"{len(colours)} distinct colours is many for masks: JPEG-saved or anti-aliased masks? save them as PNG"
            )
        if (0, 0, 0) in draft.values:
            draft.reasons.append(
                f"colour 0,0,0 covers {100 * draft.values[(0, 0, 0)] / total:.0f}% of pixels: a background class or "
                "ignored? edit `labels`"
            )
        return
    values = sorted(v for v in draft.values if v != IGNORE_INDEX)
    if IGNORE_INDEX in draft.values:
        draft.reasons.append(
            f"value 255 ({100 * draft.values[IGNORE_INDEX] / total:.2f}% of pixels) is ignored (ignore_index: 255)"
        )
    if not values:
        draft.labels, draft.classes = "train_ids", ["class_0"]
        draft.reasons.append("no value besides 255: every pixel is ignored")
        return
    start = 0 if values[0] == 0 else 1
    run_end = start
    while run_end + 1 in draft.values:
        run_end += 1
    stray = [v for v in values if v > run_end]
    stray_share = sum(draft.values[v] for v in stray) / total
    if stray and stray_share >= STRAY_SHARE:
        draft.labels = {v: f"class_{v}" for v in values}
        draft.classes = [f"class_{v}" for v in values]
        draft.reasons.append(
            f"labels guessed: a map, because the values {', '.join(map(str, values[:12]))} are not contiguous"
        )
        if 0 in draft.values:
            draft.reasons.append(_zero_reason(draft, total))
        return
    if start == 0:
        draft.labels = "train_ids"
        draft.classes = [f"class_{v}" for v in range(run_end + 1)]
        draft.reasons.append(f"labels guessed: train_ids, because the values run from 0 to {run_end}")
        draft.reasons.append(_zero_reason(draft, total))
    else:
        draft.labels = "reduce_zero_label"
        draft.classes = [f"class_{v}" for v in range(1, run_end + 1)]
        draft.reasons.append(
            f"labels guessed: reduce_zero_label, because no pixel is 0 and the values run from 1 to {run_end} "
            f"(class k is value k+1; train_ids would make a class 0 that never occurs)"
        )
    for value in stray:
        files = draft.value_files.get(value, [])
        draft.reasons.append(
            f"value {value}: {draft.values[value]} pixels ({100 * draft.values[value] / total:.3f}%) in "
            f"{len(files)}{'+' if len(files) > SHOWN_NAMES else ''} file(s) ({_first(files)}): outside "
            f"{start}..{run_end}, a mistake? `data prepare` stops at it unless the card maps it (labels: "
            "{value: class or ignore}) or the files are fixed"
        )


def _zero_reason(draft: CardDraft, total: int) -> str:
    share = 100 * draft.values[0] / total
    return (
        f"value 0 covers {share:.0f}% of pixels: a background class or ignored? edit `labels` (a class: "
        "train_ids, as guessed; ignored: reduce_zero_label, and drop the first class)"
    )


def card_text(draft: CardDraft, card_path: Path, *, name: str) -> tuple[str, dict[Path, str]]:
    """The card's YAML text (what was found as comments) and the list files of a split init made.

    Args:
        draft: what :func:`scan_folder` found.
        card_path: where the card will be written (its paths are relative to its folder).
        name: the dataset's name.

    Returns:
        ``(card text, {list file path: its text})``.
    """
    folder = card_path.parent
    lists: dict[Path, str] = {}
    splits: dict[str, Any] = {}

    def rel(path: Path) -> str:
        return Path(os.path.relpath(path.resolve(), folder.resolve())).as_posix()

    for split, found in draft.splits.items():
        if found.listed is not None:
            list_path = folder / f"{card_path.stem}_{split}.txt"
            lists[list_path] = "".join(f"{stem}\n" for stem in found.listed)
            splits[split] = {"list": list_path.name, "images": rel(found.images), "labels": rel(found.labels)}
        else:
            splits[split] = {"images": rel(found.images), "labels": rel(found.labels)}
    body: dict[str, Any] = {
        "name": name,
        "classes": draft.classes,
        "labels": draft.labels,
        "ignore_index": draft.ignore_index,
        "image_suffix": draft.image_suffix,
        "label_suffix": draft.label_suffix,
        "splits": splits,
    }
    header = [
        f"Dataset card written by `vitadapter data init {draft.root}`.",
        "Edit the class names (index = train id) and check `labels`, then:",
        f"  vitadapter data prepare --card {card_path} --out artifacts/data/{name}",
        "What init found:",
        *draft.summary_lines(),
    ]
    comments = "".join(f"# {line}\n" for line in header)
    text = yaml.safe_dump(body, sort_keys=False, default_flow_style=None, width=110, allow_unicode=True)
    return comments + text, lists


def default_name(root: Path) -> str:
    """A dataset name made from the folder's name."""
    return sample_key(root.resolve().name.lower())[:64].strip("-_") or "mydata"
