"""The samples of a dataset card's splits: folders, list files and parquet files; pairing and loading.

:func:`scan_split` lists one split's image-label pairs (:class:`CardSample`) and the files without a partner
(an image without a label map, a label map without an image). :func:`load_card_sample` reads one pair, checks
that both decode and have the same size, and converts the label map with the card's rule
(:meth:`data.cards.LabelRule.convert`). Label maps are decoded with Pillow, values unchanged (palette indices
for palette PNGs, 16-bit values for 16-bit PNGs), never through an RGB conversion unless the card maps RGB
colours (``docs/reference.md`` §E3). Parquet cells are read with pyarrow, one row group at a time.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from data.cards import DatasetCard, FolderSplit, LabelRule, ListSplit, ParquetSplit, SplitSource
from data.catalog import LabelError
from data.readers import CorruptFileError, decode_image

log = logging.getLogger(__name__)

_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]+")
MAX_KEY = 200
# names of the files without a partner shown in a message (the index records them all)
SHOWN_NAMES = 5
# Pillow modes of label maps and what they hold
SINGLE_CHANNEL_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L", "1")
RGB_MODES = ("RGB", "RGBA")
_PARQUET_CACHE = 2


@dataclass(frozen=True)
class CardRef:
    """One image or label map of a card's split: a file, or a cell of a parquet file.

    Attributes:
        path: the file.
        row: the parquet row (None: the whole file is the image or label map).
        column: the parquet column.
    """

    path: str
    row: int | None = None
    column: str | None = None

    def describe(self) -> str:
        """Where it is, for messages."""
        return self.path if self.row is None else f"{self.path} (row {self.row}, column {self.column!r})"

    def read(self) -> bytes:
        """Its bytes; ``FileNotFoundError`` naming it when missing."""
        if self.row is None:
            path = Path(self.path)
            if not path.is_file():
                raise FileNotFoundError(f"missing file {path}")
            return path.read_bytes()
        assert self.column is not None  # parquet refs always name their column
        return _parquet_cell(self.path, self.row, self.column)

    def size(self) -> int:
        """Size in bytes (the file's; for a parquet cell, its file's), -1 when missing."""
        try:
            return Path(self.path).stat().st_size
        except FileNotFoundError:
            return -1


@dataclass(frozen=True)
class CardSample:
    """One image and its label map.

    Attributes:
        key: sample key (a plain name: letters, digits, ``_``, ``-``), unique in the split.
        split: ``train`` or ``val``.
        image, label: where they are.
        name: the pair's name as found (relative path without suffix, or the parquet row), for messages.
    """

    key: str
    split: str
    image: CardRef
    label: CardRef
    name: str


@dataclass
class SplitScan:
    """One split of a card: its pairs and the files without a partner (names relative to their folders)."""

    split: str
    samples: list[CardSample] = field(default_factory=list)
    images_without_label: list[str] = field(default_factory=list)
    labels_without_image: list[str] = field(default_factory=list)
    where: str = ""

    @property
    def unpaired(self) -> int:
        return len(self.images_without_label) + len(self.labels_without_image)

    def unpaired_text(self) -> str:
        """``2 images without a label (a.jpg, b.jpg); 1 label without an image (c.png)``."""
        parts = []
        for singular, plural, names in (
            ("image without a label", "images without a label", self.images_without_label),
            ("label without an image", "labels without an image", self.labels_without_image),
        ):
            if names:
                shown = ", ".join(names[:SHOWN_NAMES]) + (
                    f", ... ({len(names) - SHOWN_NAMES} more)" if len(names) > SHOWN_NAMES else ""
                )
                parts.append(f"{len(names)} {singular if len(names) == 1 else plural} ({shown})")
        return "; ".join(parts)


def sample_key(name: str) -> str:
    """A sample key made from a pair's name: unsafe characters become ``_``; long names are shortened with a
    digest of the whole name (keys become output file names)."""
    key = _UNSAFE_KEY_CHARS.sub("_", name).strip("_") or "sample"
    if len(key) > MAX_KEY:
        key = f"{key[: MAX_KEY - 9]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return key


def _files(folder: Path) -> list[str]:
    """Relative posix names of the regular files below ``folder`` (recursively, hidden ones left out), sorted."""
    names = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(folder)
        names += [(rel / f).as_posix() for f in filenames if not f.startswith(".")]
    return sorted(names)


def _strip(name: str, suffixes: tuple[str, ...]) -> str | None:
    lower = name.lower()
    for suffix in sorted(suffixes, key=len, reverse=True):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return None


def _unique_keys(split: str, names: list[str]) -> dict[str, str]:
    """``{name: key}`` with distinct keys (a clash of two names gets a digest suffix on the second)."""
    keys: dict[str, str] = {}
    used: set[str] = set()
    for name in names:
        key = sample_key(name)
        if key in used:
            key = sample_key(f"{key}-{hashlib.sha1(name.encode()).hexdigest()[:8]}")
        used.add(key)
        keys[name] = key
    return keys


def _pairs(split: str, images: dict[str, CardRef], labels: dict[str, CardRef], *, where: str) -> SplitScan:
    scan = SplitScan(split, where=where)
    keys = _unique_keys(split, sorted(set(images) & set(labels)))
    for name in sorted(keys):
        scan.samples.append(CardSample(keys[name], split, images[name], labels[name], name))
    scan.images_without_label = sorted(
        Path(ref.path).name if ref.row is None else name for name, ref in images.items() if name not in labels
    )
    scan.labels_without_image = sorted(
        Path(ref.path).name if ref.row is None else name for name, ref in labels.items() if name not in images
    )
    return scan


def _scan_folders(card: DatasetCard, split: str, source: FolderSplit) -> SplitScan:
    same = source.images.resolve() == source.labels.resolve()
    images: dict[str, CardRef] = {}
    for rel in _files(source.images):
        if same and rel.lower().endswith(card.label_suffix):
            continue  # images and label maps in one folder: a file with the label suffix is a label map
        stem = _strip(rel, card.image_suffixes)
        if stem is not None:
            images[stem] = CardRef(str(source.images / rel))
    labels = {}
    for rel in _files(source.labels):
        stem = _strip(rel, (card.label_suffix,))
        if stem is not None:
            labels[stem] = CardRef(str(source.labels / rel))
    return _pairs(split, images, labels, where=f"images {source.images}, labels {source.labels}")


def _scan_list(card: DatasetCard, split: str, source: ListSplit) -> SplitScan:
    images: dict[str, CardRef] = {}
    labels: dict[str, CardRef] = {}
    for number, line in enumerate(source.list.read_text().splitlines(), 1):
        tokens = line.split("#", 1)[0].split()
        if not tokens:
            continue
        if len(tokens) == 1:
            stem = tokens[0]
            found = [source.images / f"{stem}{s}" for s in card.image_suffixes]
            image = next((p for p in found if p.is_file()), None)
            label = source.labels / f"{stem}{card.label_suffix}"
        elif len(tokens) == 2:
            image, label = source.images / tokens[0], source.labels / tokens[1]
            stem = _strip(tokens[0], card.image_suffixes) or tokens[0]
            image = image if image.is_file() else None
        else:
            raise ValueError(
                f"{source.list}:{number}: expected a stem or an image and a label path, got {len(tokens)} fields"
            )
        if image is not None:
            images[stem] = CardRef(str(image))
        if label.is_file():
            labels[stem] = CardRef(str(label))
        elif image is None:  # neither exists: the list names a pair that is not there
            images[stem] = CardRef(str(source.images / stem))
    return _pairs(split, images, labels, where=f"list {source.list}")


def _scan_parquet(split: str, source: ParquetSplit) -> SplitScan:
    import pyarrow.parquet as pq

    scan = SplitScan(split, where=f"parquet {source.pattern}")
    names: list[tuple[str, str, int]] = []
    for path in source.files:
        try:
            schema = pq.read_schema(path)
            file = pq.ParquetFile(path)
        except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
            raise CorruptFileError(f"{path}: not a readable parquet file ({err})") from err
        missing = [c for c in (source.image, source.label) if c not in schema.names]
        if missing:
            raise CorruptFileError(
                f"{path}: no column {missing[0]!r} (its columns: {', '.join(schema.names)}); name the image and "
                "label columns in the card (splits.<split>.image, .label)"
            )
        for row in range(file.metadata.num_rows):
            names.append((f"{path.stem}_{row:06d}", str(path), row))
    keys = _unique_keys(split, [n for n, _, _ in names])
    for name, path, row in names:
        scan.samples.append(
            CardSample(
                keys[name], split, CardRef(path, row, source.image), CardRef(path, row, source.label), name
            )
        )
    return scan


def scan_split(card: DatasetCard, split: str) -> SplitScan:
    """The pairs and unpaired files of ``split`` of ``card``."""
    source: SplitSource = card.splits[split]
    if isinstance(source, FolderSplit):
        return _scan_folders(card, split, source)
    if isinstance(source, ListSplit):
        return _scan_list(card, split, source)
    return _scan_parquet(split, source)


@functools.lru_cache(maxsize=_PARQUET_CACHE)
def _row_group(path: str, group: int, column: str, pid: int) -> list[Any]:
    # ``pid`` is part of the key: worker processes read their own copy
    del pid
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).read_row_group(group, columns=[column]).column(0).to_pylist()


@functools.lru_cache(maxsize=16)
def _row_groups(path: str) -> tuple[int, ...]:
    import pyarrow.parquet as pq

    metadata = pq.ParquetFile(path).metadata
    return tuple(metadata.row_group(i).num_rows for i in range(metadata.num_row_groups))


def _parquet_cell(path: str, row: int, column: str) -> bytes:
    start = 0
    for group, count in enumerate(_row_groups(path)):
        if row < start + count:
            value = _row_group(path, group, column, os.getpid())[row - start]
            break
        start += count
    else:
        raise FileNotFoundError(f"{path} has no row {row}")
    if isinstance(value, dict):  # the Hugging Face Image feature: {"bytes": ..., "path": ...}
        value = value.get("bytes")
    if not isinstance(value, bytes | bytearray) or not value:
        raise CorruptFileError(
            f"{path} (row {row}, column {column!r}): holds no encoded image bytes ({type(value).__name__})"
        )
    return bytes(value)


def decode_card_label(data: bytes, rule: LabelRule, *, source: str) -> tuple[np.ndarray, str]:
    """A label map decoded with Pillow, values unchanged: ``(H, W)`` integers, or ``(H, W, 3)`` RGB when the card
    maps colours (a palette PNG is then read as its colours); and the file's Pillow mode.

    Raises:
        CorruptFileError: the bytes do not decode (naming ``source``).
        LabelError: a mode that is no label map (CMYK, float).
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            mode = image.mode
            if rule.rgb and mode in ("P", "RGBA", "RGB"):
                array = np.array(image.convert("RGB"))
            elif mode in ("LA", "PA"):  # a grey or palette map with an alpha channel: the values are the map
                array = np.array(image)[..., 0]
            elif mode == "RGBA" and not rule.rgb:
                array = np.array(image.convert("RGB"))
            else:
                array = np.array(image)
    except Image.DecompressionBombError as err:
        raise CorruptFileError(f"{source}: label map too large to decode safely ({err})") from err
    except (OSError, SyntaxError, ValueError, EOFError, zlib.error) as err:
        raise CorruptFileError(f"{source}: corrupt label map ({err})") from err
    if mode not in (*SINGLE_CHANNEL_MODES, *RGB_MODES, "LA", "PA"):
        raise LabelError(f"{source}: Pillow mode {mode!r} is not a label map (expected L, P, I;16 or RGB)")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    return array, mode


@dataclass(frozen=True)
class LoadedCardSample:
    """A checked pair: the image's bytes unchanged, its shard extension, train ids and metadata."""

    image_bytes: bytes
    image_ext: str
    label: np.ndarray
    meta: dict[str, Any]


def _image_ext(ref: CardRef, data: bytes) -> str:
    if ref.row is None:
        return Path(ref.path).suffix.lstrip(".").lower() or "jpg"
    for magic, ext in ((b"\x89PNG", "png"), (b"\xff\xd8", "jpg"), (b"RIFF", "webp"), (b"BM", "bmp")):
        if data.startswith(magic):
            return ext
    return "tif" if data[:2] in (b"II", b"MM") else "jpg"


def load_card_sample(sample: CardSample, rule: LabelRule) -> LoadedCardSample:
    """Read, decode and check one pair; convert its label map to train ids.

    Raises:
        CorruptFileError: an unreadable or missing file, or image and label map of different sizes.
        LabelError: a label value (or colour) the card does not map, an RGB mask without an RGB map.
    """
    try:
        image_bytes = sample.image.read()
        label_bytes = sample.label.read()
    except FileNotFoundError as err:
        raise CorruptFileError(str(err)) from err
    image = decode_image(image_bytes, source=sample.image.describe())
    label_source = sample.label.describe()
    raw, mode = decode_card_label(label_bytes, rule, source=label_source)
    if raw.shape[:2] != image.shape[:2]:
        raise CorruptFileError(
            f"{label_source}: label map size {raw.shape[1]}x{raw.shape[0]} (WxH) differs from the image's "
            f"{image.shape[1]}x{image.shape[0]} ({sample.image.describe()})"
        )
    label = rule.convert(raw, source=label_source)
    height, width = label.shape
    meta = {
        "key": sample.key,
        "split": sample.split,
        "height": height,
        "width": width,
        "image_file": sample.image.describe(),
        "label_file": label_source,
        "label_encoding": "card",
        "label_mode": mode,
    }
    return LoadedCardSample(image_bytes, _image_ext(sample.image, image_bytes), label, meta)
