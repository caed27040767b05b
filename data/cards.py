"""Dataset cards: a user's dataset described by a YAML file, checked strictly, and its label rule.

A card (paths relative to the card's folder)::

    name: toppings                       # plain name: letters, digits, _ and -
    classes: [background, ham, olive]    # index = train id
    palette: [[0, 0, 0], [220, 20, 60], [0, 128, 0]]   # optional; generated when absent
    labels: train_ids                    # train_ids | reduce_zero_label | {raw value: class or "ignore"}
                                         # | for RGB masks {"R,G,B": class or "ignore"}
    ignore_index: 255                    # raw value(s) ignored by loss and metric (default 255)
    image_suffix: .jpg                   # default: any of IMAGE_SUFFIXES
    label_suffix: .png
    splits:
      train: {images: images/training, labels: annotations/training}     # folders
      val: {list: val.txt, images: images, labels: masks}                # a list of stems (or pairs)
      # or {parquet: "data/val-*.parquet", image: image, label: annotation}  (encoded image bytes)

:func:`load_card` checks every key (an unknown key, a duplicate class name, a palette of the wrong length, a
label map naming no class, a missing folder: a :class:`CardError` naming the key or path).
:meth:`LabelRule.convert` turns one decoded label map into train ids (``0 .. K-1``, 255 ignored) and names,
for a value the card does not map, the file, the value, its pixel count and the likely mistake (``did you mean
reduce_zero_label?``). The three official datasets are the built-in cards of :mod:`data.catalog`.
"""

from __future__ import annotations

import glob
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

from data.catalog import (
    IGNORE_INDEX,
    MAX_CLASSES,
    SPLITS,
    DatasetInfo,
    LabelError,
    check_dataset_name,
    make_palette,
)

IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
DEFAULT_LABEL_SUFFIX = ".png"
CARD_KEYS = (
    "name",
    "title",
    "classes",
    "palette",
    "labels",
    "ignore_index",
    "image_suffix",
    "label_suffix",
    "splits",
)
IGNORE = "ignore"
RuleKind = Literal["train_ids", "reduce_zero_label", "map", "rgb_map"]
RULE_WORDS: tuple[str, ...] = ("train_ids", "reduce_zero_label")
# unmapped values named in one error message
SHOWN_VALUES = 5


class CardError(ValueError):
    """A dataset card that cannot be used; the message names the card file and the key or path."""


@dataclass(frozen=True)
class FolderSplit:
    """Images and label maps paired by their path below two folders (without the suffix)."""

    images: Path
    labels: Path


@dataclass(frozen=True)
class ListSplit:
    """The samples a list file names: one stem per line (found in ``images``/``labels``), or an image and a
    label path per line (relative to ``images``/``labels``)."""

    list: Path
    images: Path
    labels: Path


@dataclass(frozen=True)
class ParquetSplit:
    """Rows of parquet files with an image column and a label column of encoded image bytes (the layout of
    the Hugging Face Hub's segmentation sets: a binary column, or a struct with ``bytes`` and ``path``)."""

    pattern: str
    files: tuple[Path, ...]
    image: str
    label: str


SplitSource = FolderSplit | ListSplit | ParquetSplit


def _describe_values(values: list[int], counts: list[int]) -> str:
    shown = ", ".join(f"{v} ({c} pixels)" for v, c in zip(values[:SHOWN_VALUES], counts, strict=False))
    more = f" and {len(values) - SHOWN_VALUES} more" if len(values) > SHOWN_VALUES else ""
    return shown + more


@dataclass(frozen=True)
class LabelRule:
    """How raw label values become train ids.

    Attributes:
        kind: ``train_ids`` (values are class indices), ``reduce_zero_label`` (0 ignored, k -> k-1), ``map``
            (raw value -> train id or ignore), ``rgb_map`` (RGB colour -> train id or ignore).
        num_classes: K.
        mapping: ``map``: ``{raw value: train id or 255}``; ``rgb_map``: ``{(r, g, b): train id or 255}``.
        ignore_values: raw values (or colours) ignored besides those the map sends to ignore.
    """

    kind: RuleKind
    num_classes: int
    mapping: dict[Any, int] = field(default_factory=dict)
    ignore_values: tuple[Any, ...] = (IGNORE_INDEX,)

    @property
    def rgb(self) -> bool:
        return self.kind == "rgb_map"

    def describe(self) -> str:
        """One line: the conversion (what the index records as its label convention)."""
        ignored = ", ".join(str(v) for v in self.ignore_values) or "nothing"
        if self.kind == "train_ids":
            return f"raw k in 0..{self.num_classes - 1} -> k (train ids); {ignored} ignored"
        if self.kind == "reduce_zero_label":
            return f"raw 0 -> ignored, raw k in 1..{self.num_classes} -> k-1 (reduce_zero_label); {ignored} ignored"
        kind = "RGB colour" if self.rgb else "raw value"
        pairs = ", ".join(
            f"{','.join(map(str, k)) if self.rgb else k}->{'ignore' if v == IGNORE_INDEX else v}"
            for k, v in sorted(self.mapping.items())
        )
        return f"{kind} map {pairs}; {ignored} ignored"

    def _value_table(self) -> dict[int, int]:
        if self.kind == "train_ids":
            table = {k: k for k in range(self.num_classes)}
        elif self.kind == "reduce_zero_label":
            table = {0: IGNORE_INDEX, **{k: k - 1 for k in range(1, self.num_classes + 1)}}
        else:
            table = dict(self.mapping)
        for value in self.ignore_values:
            table.setdefault(int(value), IGNORE_INDEX)
        return table

    def convert(self, raw: np.ndarray, *, source: str) -> np.ndarray:
        """Train ids of a decoded label map: ``(H, W)`` integers, or ``(H, W, 3)`` RGB for an ``rgb_map``.

        Raises:
            LabelError: a value (or colour) the card does not map, naming ``source``, the values, their pixel
                counts and the likely mistake; a map of the wrong kind (an RGB mask without an RGB map).
        """
        if raw.ndim == 3:
            if not self.rgb:
                raise LabelError(
                    f"{source}: an RGB label map (colours, not class indices), but the card's labels rule is "
                    f'{self.kind}: map its colours (labels: {{"R,G,B": class name or ignore}}; '
                    "`vitadapter data init` lists the colours it finds)"
                )
            return self._convert_rgb(raw, source=source)
        if self.rgb:
            raise LabelError(
                f'{source}: a single-channel label map, but the card maps RGB colours (labels: {{"R,G,B": ...}}); '
                "map its values instead (labels: train_ids, reduce_zero_label or {value: class})"
            )
        if raw.ndim != 2 or not np.issubdtype(raw.dtype, np.integer) or (raw.size and raw.min() < 0):
            raise LabelError(f"{source}: not a label map of non-negative integers ({raw.shape} {raw.dtype})")
        table = self._value_table()
        size = max(int(raw.max(initial=0)) + 1, max(table, default=0) + 1)
        lookup = np.full(size, -1, dtype=np.int16)
        for value, train_id in table.items():
            lookup[value] = train_id
        converted = lookup[raw]
        bad = converted < 0
        if bad.any():
            counts = np.bincount(raw[bad].ravel().astype(np.int64))
            values = np.flatnonzero(counts).tolist()
            raise LabelError(self._unmapped_message(source, values, counts[values].tolist(), raw))
        return converted.astype(np.uint8)

    def _unmapped_message(self, source: str, values: list[int], counts: list[int], raw: np.ndarray) -> str:
        k = self.num_classes
        what = "label value" if len(values) == 1 else "label values"
        head = f"{source}: {what} {_describe_values(values, counts)} not mapped by the card"
        ignored = [str(v) for v in self.ignore_values]
        hints = []
        if self.kind == "train_ids":
            rule = f"labels: train_ids takes 0..{k - 1} as the {k} classes"
            if k in values and bool((raw == 0).any()):
                hints.append(
                    f"did you mean reduce_zero_label (raw 0 ignored, 1..{k} -> 0..{k - 1})? or the card lacks a "
                    f"class (it lists {k})"
                )
            elif k in values:
                hints.append(f"did you mean reduce_zero_label (1..{k} -> 0..{k - 1})?")
        elif self.kind == "reduce_zero_label":
            rule = f"labels: reduce_zero_label takes 1..{k} as the {k} classes (0 ignored)"
            if k + 1 in values:
                hints.append(f"the card lists {k} classes: one missing?")
        else:
            rule = "the card's labels map does not list it"
        listed = ", ".join([*ignored, *map(str, values[:SHOWN_VALUES])])
        hints.append(
            f"ignore it (ignore_index: [{listed}]), map it (labels: {{value: class or ignore}}) or fix the file"
        )
        rule += f"; ignored: {', '.join(ignored) or 'nothing'}"
        return "; ".join([head, rule, *hints])

    def _convert_rgb(self, raw: np.ndarray, *, source: str) -> np.ndarray:
        if raw.shape[-1] != 3 or raw.dtype != np.uint8:
            raise LabelError(
                f"{source}: expected an (H, W, 3) uint8 RGB label map, got {raw.shape} {raw.dtype}"
            )
        codes = (raw[..., 0].astype(np.uint32) << 16) | (raw[..., 1].astype(np.uint32) << 8) | raw[..., 2]
        table = {(r << 16) | (g << 8) | b: t for (r, g, b), t in self.mapping.items()}
        for r, g, b in self.ignore_values:
            table.setdefault((r << 16) | (g << 8) | b, IGNORE_INDEX)
        colours, inverse, counts = np.unique(codes.ravel(), return_inverse=True, return_counts=True)
        ids = np.array([table.get(int(c), -1) for c in colours], dtype=np.int16)
        missing = np.flatnonzero(ids < 0)
        if missing.size:
            order = missing[np.argsort(-counts[missing])]
            shown = ", ".join(
                f"({c >> 16},{(c >> 8) & 255},{c & 255}) ({counts[i]} pixels)"
                for i, c in ((i, int(colours[i])) for i in order[:SHOWN_VALUES])
            )
            more = f" and {len(order) - SHOWN_VALUES} more" if len(order) > SHOWN_VALUES else ""
            raise LabelError(
                f"{source}: colours {shown}{more} not mapped by the card's RGB labels map; add them "
                '(labels: {"R,G,B": class name or ignore}; a JPEG-saved or anti-aliased mask has many stray '
                "colours: save masks as PNG)"
            )
        return ids[inverse].reshape(codes.shape).astype(np.uint8)


@dataclass(frozen=True)
class DatasetCard:
    """A loaded, checked dataset card.

    Attributes:
        path: the card file.
        sha256: its sha256 (recorded with the shards).
        name, title, classes, colors: the dataset's name, title, class names (index = train id) and RGB colours.
        rule: how raw labels become train ids.
        image_suffixes, label_suffix: file suffixes of images and label maps (lower case).
        splits: ``{"train": ..., "val": ...}`` sources.
        content: the card's YAML mapping as read.
    """

    path: Path
    sha256: str
    name: str
    title: str
    classes: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]
    rule: LabelRule
    image_suffixes: tuple[str, ...]
    label_suffix: str
    splits: dict[str, SplitSource]
    content: dict[str, Any]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def info(self) -> DatasetInfo:
        """The card as a catalog entry (what :func:`data.catalog.register_dataset` takes)."""
        return DatasetInfo(
            name=self.name,
            title=self.title,
            class_names=self.classes,
            split_sizes={},
            raw_encoding="card",
            label_convention=self.rule.describe(),
            reduce_zero_label=self.rule.kind == "reduce_zero_label",
            colors=self.colors,
            own=True,
            card_sha256=self.sha256,
        )

    def index_record(self) -> dict[str, Any]:
        """What the shards' ``index.json`` records of the card: its file, sha256 and content, and the dataset
        record (classes, palette: :meth:`data.catalog.DatasetInfo.to_record`) the runs on the shards use."""
        return {
            "file": str(self.path),
            "sha256": self.sha256,
            "content": self.content,
            "dataset": self.info().to_record(),
        }


def _error(card: Path, where: str, message: str) -> CardError:
    return CardError(f"{card}: {where}: {message}")


def _suffixes(card: Path, key: str, value: Any, default: tuple[str, ...]) -> tuple[str, ...]:
    if value is None:
        return default
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(s, str) and s for s in items):
        raise _error(card, key, f"{value!r} is not a suffix or a list of suffixes (.jpg)")
    # "png" means ".png"; "_mask.png" stays as written (a label map named like its image plus a suffix)
    return tuple(s.lower() if "." in s else f".{s.lower()}" for s in items)


def _colour(card: Path, where: str, value: Any) -> tuple[int, int, int]:
    parts = value.split(",") if isinstance(value, str) else value
    try:
        rgb = tuple(int(str(p).strip()) for p in parts)
    except (TypeError, ValueError):
        rgb = ()
    if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
        raise _error(card, where, f'{value!r} is not an RGB colour (three values 0..255, as "R,G,B")')
    return (rgb[0], rgb[1], rgb[2])


def _rule(card: Path, raw: Mapping[str, Any], classes: tuple[str, ...]) -> LabelRule:
    labels = raw.get("labels", "train_ids")
    index = {name: i for i, name in enumerate(classes)}
    rgb_ignores = isinstance(labels, Mapping) and any(isinstance(k, str) and "," in k for k in labels)
    ignore_raw = raw.get("ignore_index", [] if rgb_ignores else IGNORE_INDEX)
    ignore_items = ignore_raw if isinstance(ignore_raw, list) else [ignore_raw]
    if isinstance(labels, str):
        if labels not in RULE_WORDS:
            raise _error(
                card, "labels", f"{labels!r}: expected train_ids, reduce_zero_label or a map {{value: class}}"
            )
        ignores = tuple(_ignore_value(card, v) for v in ignore_items)
        kind: RuleKind = "train_ids" if labels == "train_ids" else "reduce_zero_label"
        highest = len(classes) - 1 if kind == "train_ids" else len(classes)
        clash = [v for v in ignores if v <= highest and not (kind == "reduce_zero_label" and v == 0)]
        if clash:
            raise _error(card, "ignore_index", f"{clash[0]} is also a class value under labels: {labels}")
        return LabelRule(kind, len(classes), {}, ignores)
    if not isinstance(labels, Mapping) or not labels:
        raise _error(card, "labels", f"{labels!r}: expected train_ids, reduce_zero_label or a non-empty map")
    rgb = all(isinstance(k, str) and "," in k for k in labels)
    if not rgb and not all(isinstance(k, int) and not isinstance(k, bool) for k in labels):
        raise _error(
            card, "labels", 'map keys must all be raw values (integers) or all RGB colours ("R,G,B")'
        )
    mapping: dict[Any, int] = {}
    for key, target in labels.items():
        where = f"labels.{key}"
        if target == IGNORE:
            train_id = IGNORE_INDEX
        elif isinstance(target, str) and target in index:
            train_id = index[target]
        else:
            raise _error(card, where, f"{target!r} is neither one of the classes nor {IGNORE!r}")
        if rgb:
            mapping[_colour(card, where, key)] = train_id
        else:
            if not 0 <= key <= 65535:
                raise _error(card, where, "a raw value must lie in 0..65535")
            mapping[int(key)] = train_id
    unused = [name for name, i in index.items() if i not in mapping.values()]
    if unused:
        raise _error(card, "labels", f"no raw value maps to the class(es) {', '.join(map(repr, unused))}")
    if rgb:
        ignores_rgb = tuple(_colour(card, "ignore_index", v) for v in ignore_items)
        return LabelRule("rgb_map", len(classes), mapping, ignores_rgb)
    ignores = tuple(_ignore_value(card, v) for v in ignore_items)
    clash = [v for v in ignores if v in mapping and mapping[v] != IGNORE_INDEX]
    if clash:
        raise _error(card, "ignore_index", f"{clash[0]} is also mapped to a class in labels")
    return LabelRule("map", len(classes), mapping, ignores)


def _ignore_value(card: Path, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise _error(card, "ignore_index", f"{value!r} is not a raw label value (0..65535)")
    return int(value)


def _folder(card: Path, where: str, value: Any, *, must_exist: bool = True) -> Path:
    if not isinstance(value, str) or not value:
        raise _error(card, where, f"{value!r} is not a folder path")
    path = Path(value) if Path(value).is_absolute() else card.parent / value
    if must_exist and not path.is_dir():
        raise _error(card, where, f"no such folder {path}")
    return path


def _split(card: Path, name: str, value: Any) -> SplitSource:
    where = f"splits.{name}"
    if not isinstance(value, Mapping):
        raise _error(
            card, where, "expected a mapping {images: ..., labels: ...}, {list: ...} or {parquet: ...}"
        )
    keys = set(value)
    if "parquet" in keys:
        unknown = keys - {"parquet", "image", "label"}
        if unknown:
            raise _error(
                card,
                f"{where}.{sorted(unknown)[0]}",
                "unknown key (parquet splits take parquet, image, label)",
            )
        pattern = value["parquet"]
        if not isinstance(pattern, str) or not pattern:
            raise _error(card, f"{where}.parquet", f"{pattern!r} is not a file pattern")
        full = pattern if Path(pattern).is_absolute() else str(card.parent / pattern)
        files = tuple(sorted(Path(p) for p in glob.glob(full, recursive=True) if Path(p).is_file()))
        if not files:
            raise _error(card, f"{where}.parquet", f"no file matches {full}")
        columns = [value.get("image", "image"), value.get("label", "label")]
        if not all(isinstance(c, str) and c for c in columns):
            raise _error(card, where, "image and label name the parquet columns (strings)")
        return ParquetSplit(pattern, files, columns[0], columns[1])
    if "list" in keys:
        unknown = keys - {"list", "images", "labels"}
        if unknown:
            raise _error(
                card, f"{where}.{sorted(unknown)[0]}", "unknown key (list splits take list, images, labels)"
            )
        list_file = value["list"]
        if not isinstance(list_file, str) or not list_file:
            raise _error(card, f"{where}.list", f"{list_file!r} is not a file path")
        path = Path(list_file) if Path(list_file).is_absolute() else card.parent / list_file
        if not path.is_file():
            raise _error(card, f"{where}.list", f"no such file {path}")
        images = _folder(card, f"{where}.images", value.get("images", "."))
        labels = _folder(card, f"{where}.labels", value.get("labels", "."))
        return ListSplit(path, images, labels)
    unknown = keys - {"images", "labels"}
    if unknown:
        raise _error(card, f"{where}.{sorted(unknown)[0]}", "unknown key (folder splits take images, labels)")
    for key in ("images", "labels"):
        if key not in value:
            raise _error(card, f"{where}.{key}", "missing (the folder of the split's images and label maps)")
    return FolderSplit(
        _folder(card, f"{where}.images", value["images"]), _folder(card, f"{where}.labels", value["labels"])
    )


def parse_card(raw: Any, path: Path, sha256: str) -> DatasetCard:
    """Check a card's YAML mapping ``raw`` read from ``path`` (paths relative to its folder).

    Raises:
        CardError: naming the card file and the key or path.
    """
    if not isinstance(raw, Mapping):
        raise CardError(f"{path}: a dataset card is a YAML mapping (name, classes, labels, splits, ...)")
    unknown = [k for k in raw if k not in CARD_KEYS]
    if unknown:
        raise _error(path, str(unknown[0]), f"unknown key (a card has {', '.join(CARD_KEYS)})")
    for key in ("name", "classes", "splits"):
        if key not in raw:
            raise _error(path, key, "missing")
    try:
        name = check_dataset_name(raw["name"], where="name")
    except ValueError as err:
        raise CardError(f"{path}: {err}") from None
    classes_raw = raw["classes"]
    if not isinstance(classes_raw, list) or not classes_raw:
        raise _error(path, "classes", "expected a non-empty list of class names (index = train id)")
    if len(classes_raw) > MAX_CLASSES:
        raise _error(
            path, "classes", f"{len(classes_raw)} classes; at most {MAX_CLASSES} (255 is the ignore index)"
        )
    for i, cls in enumerate(classes_raw):
        if not isinstance(cls, str) or not cls.strip():
            raise _error(path, f"classes[{i}]", f"{cls!r} is not a class name")
        if cls == IGNORE:
            raise _error(
                path, f"classes[{i}]", f"{IGNORE!r} is reserved for ignored pixels; it cannot be a class"
            )
    seen: dict[str, int] = {}
    for i, cls in enumerate(classes_raw):
        if cls in seen:
            raise _error(path, f"classes[{i}]", f"duplicate class name {cls!r} (also classes[{seen[cls]}])")
        seen[cls] = i
    classes = tuple(classes_raw)
    palette_raw = raw.get("palette")
    if palette_raw is None:
        colors = tuple((int(r), int(g), int(b)) for r, g, b in make_palette(len(classes)).tolist())
    else:
        if not isinstance(palette_raw, list) or len(palette_raw) != len(classes):
            count = len(palette_raw) if isinstance(palette_raw, list) else "no list of"
            raise _error(
                path, "palette", f"{count} colours for {len(classes)} classes (one [R, G, B] per class)"
            )
        colors = tuple(_colour(path, f"palette[{i}]", c) for i, c in enumerate(palette_raw))
    title = raw.get("title", f"{name} (own data, {len(classes)} classes)")
    if not isinstance(title, str):
        raise _error(path, "title", f"{title!r} is not a string")
    rule = _rule(path, raw, classes)
    image_suffixes = _suffixes(path, "image_suffix", raw.get("image_suffix"), IMAGE_SUFFIXES)
    (label_suffix,) = _suffixes(path, "label_suffix", raw.get("label_suffix"), (DEFAULT_LABEL_SUFFIX,))[:1]
    splits_raw = raw["splits"]
    if not isinstance(splits_raw, Mapping):
        raise _error(path, "splits", "expected a mapping {train: ..., val: ...}")
    for split in splits_raw:
        if split not in SPLITS:
            raise _error(path, f"splits.{split}", f"unknown split (the splits are {', '.join(SPLITS)})")
    for split in SPLITS:
        if split not in splits_raw:
            raise _error(path, f"splits.{split}", "missing (training needs train, evaluation val)")
    splits = {split: _split(path, split, splits_raw[split]) for split in SPLITS}
    return DatasetCard(
        path=path,
        sha256=sha256,
        name=name,
        title=title,
        classes=classes,
        colors=colors,
        rule=rule,
        image_suffixes=image_suffixes,
        label_suffix=label_suffix,
        splits=splits,
        content=dict(raw),
    )


def load_card(path: str | Path) -> DatasetCard:
    """Read and check the dataset card ``path``.

    Raises:
        FileNotFoundError: no such file.
        CardError: invalid YAML or content, naming the key or path.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"dataset card {path} does not exist (`vitadapter data init DIR --out {path}` writes one)"
        )
    data = path.read_bytes()
    try:
        raw = yaml.safe_load(data)
    except yaml.YAMLError as err:
        raise CardError(f"{path}: not valid YAML: {err}") from None
    return parse_card(raw, path, hashlib.sha256(data).hexdigest())
