"""The dataset catalog: class names, palettes, raw label encodings, train-id conversion, split sizes.

Follows ``docs/reference.md`` §D (label conversions of mmsegmentation's dataset converters) and
``docs/reference.md §R5 (class names, ``reduce_zero_label``). Imports no torch, so listing datasets and
validating options stays instant.

Every raw label map is turned into *train ids*: ``0 .. num_classes - 1`` for the classes and
:data:`IGNORE_INDEX` (255) for pixels the loss and the metric ignore. The conversions are:

* ADE20K (``ade20k_raw``): raw 0 ("other") becomes 255, raw ``k`` in 1..150 becomes ``k - 1``
  (mmsegmentation's ``reduce_zero_label``).
* COCO-Stuff-164k (``coco_stuff_raw``): the stuffthingmaps ids 0..181 (COCO category id minus one) without
  the eleven unused ids, in increasing order, become 0..170; 255 stays 255 (mmsegmentation's
  ``coco_stuff164k`` converter). ``coco_stuff_train_ids`` is the converter's output (``*_labelTrainIds.png``),
  read as is.
* Pascal Context 59 (``pascal_context_459``): the 459-class ids of the PASCAL-Context annotations; the 60 kept
  ids, sorted, become 0..59 (mmsegmentation's ``pascal_context`` converter, which asserts that every pixel id
  is kept), then ``reduce_zero_label``: background 0 becomes 255, ``k`` becomes ``k - 1``.
  ``pascal_context_59`` is the converter's output (``SegmentationClassContext/*.png``, 0..59).
  ``pascal_context_459_full`` reads the original release's ``trainval/*.mat`` LabelMaps, which annotate all
  459 classes: the ids outside the kept list are background in the 59-class task and become 255 too (the
  Detail API JSON, read with ``pascal_context_459``, holds the kept ids only, as the converter asserts).

The catalog is open: the three datasets above are its built-in cards (:data:`CATALOG`); a user's dataset card
(``data/cards.py``: classes, palette, label rule, splits, read from YAML) is registered at run time with
:func:`register_dataset` from the card itself, from the ``index.json`` of its shards or from a checkpoint
(:meth:`DatasetInfo.to_record` / :func:`dataset_from_record`), and is then found by :func:`get_dataset` like
the built-in ones.

Differences from the reference converters, on purpose: a raw id outside the documented encoding (for example
ADE20K 151, COCO-Stuff 182..254 or one of its eleven unused ids, a Pascal Context id that is not kept) is an
error naming the file instead of being passed through silently. Those ids never occur in the official data.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from data.class_names import ADE20K_CLASSES, COCO_STUFF_164K_CLASSES, PASCAL_CONTEXT_59_CLASSES

DatasetName = Literal["ade20k", "coco_stuff164k", "pascal_context_59"]
Split = Literal["train", "val"]
LabelEncoding = Literal[
    "ade20k_raw",
    "coco_stuff_raw",
    "coco_stuff_train_ids",
    "pascal_context_459",
    "pascal_context_459_full",
    "pascal_context_59",
]

DATASET_NAMES: tuple[DatasetName, ...] = ("ade20k", "coco_stuff164k", "pascal_context_59")
# a dataset card's name: one plain word (it names shard folders, run folders, MLflow tags and DVC stages)
DATASET_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
# train ids are uint8 with 255 the ignore index: at most 255 classes
MAX_CLASSES = 255
SPLITS: tuple[Split, ...] = ("train", "val")
IGNORE_INDEX = 255

# COCO-Stuff-164k: stuffthingmaps ids that are never a class (COCO category ids 12, 26, 29, 30, 45, 66, 68,
# 69, 71, 83, 91 minus one).
COCO_STUFF_UNUSED_IDS: tuple[int, ...] = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
COCO_STUFF_MAX_RAW_ID = 181
COCO_STUFF_RAW_CLASS_IDS: tuple[int, ...] = tuple(
    i for i in range(COCO_STUFF_MAX_RAW_ID + 1) if i not in COCO_STUFF_UNUSED_IDS
)

# Pascal Context: the 459-class ids kept by the 59-class reduction (0 = background), sorted.
PASCAL_CONTEXT_KEPT_IDS: tuple[int, ...] = (
    0, 2, 9, 18, 19, 22, 23, 25, 31, 33, 34, 44, 45, 46, 59, 65, 68, 72, 80, 85, 98, 104, 105, 113, 115,
    144, 158, 159, 162, 187, 189, 207, 220, 232, 258, 259, 260, 284, 295, 296, 308, 324, 326, 347, 349,
    354, 355, 360, 366, 368, 397, 415, 416, 420, 424, 427, 440, 445, 454, 458,
)  # fmt: skip
PASCAL_CONTEXT_NUM_RAW_CLASSES = 459
ADE20K_NUM_RAW_IDS = 151  # 0 ("other") and the 150 classes

# Marks an id that is not part of an encoding in the lookup tables below.
_INVALID = -1


class LabelError(ValueError):
    """A label map holds values outside its encoding, or cannot be read as a label map."""


@dataclass(frozen=True)
class DatasetInfo:
    """Facts about one dataset.

    A built-in card (:data:`CATALOG`) or a user's dataset card (``own``: :mod:`data.cards`).

    Attributes:
        name: catalog name (``ade20k``, ``coco_stuff164k``, ``pascal_context_59``, or a card's name).
        title: human-readable name.
        class_names: class names indexed by train id.
        split_sizes: official number of images per split (empty for a user's card).
        raw_encoding: encoding of the label maps as distributed (``card`` for a user's card: its label rule).
        label_convention: one-line description of the raw-to-train-id conversion.
        reduce_zero_label: whether the reference applies mmsegmentation's ``reduce_zero_label``.
        download_help: which files to download and where they go, ``{raw}`` standing for the raw folder.
        colors: the card's RGB colour per train id; None: :func:`make_palette`.
        own: a user's card (no published row to compare with).
        card_sha256: sha256 of the card file (user cards).
    """

    name: str
    title: str
    class_names: tuple[str, ...]
    split_sizes: dict[str, int]
    raw_encoding: str
    label_convention: str
    reduce_zero_label: bool
    download_help: str = field(repr=False, default="")
    colors: tuple[tuple[int, int, int], ...] | None = None
    own: bool = False
    card_sha256: str | None = None

    @property
    def num_classes(self) -> int:
        """Number of classes (train ids ``0 .. num_classes - 1``)."""
        return len(self.class_names)

    @property
    def ignore_index(self) -> int:
        """Train id of ignored pixels."""
        return IGNORE_INDEX

    def download_instructions(self, raw: object) -> str:
        """Which files to download and where to put them, for a dataset expected under ``raw``."""
        return self.download_help.replace("{raw}", str(raw))

    @property
    def palette(self) -> np.ndarray:
        """RGB colour per train id, ``(num_classes, 3)`` uint8: the card's colours, else :func:`make_palette`."""
        if self.colors is not None:
            return np.array(self.colors, dtype=np.uint8).reshape(-1, 3)
        return make_palette(self.num_classes)

    def to_record(self) -> dict[str, Any]:
        """What a shard index, a checkpoint, an export or a served model records of the dataset (JSON-able):
        enough to name and colour its classes without the card file (:func:`dataset_from_record`)."""
        return {
            "name": self.name,
            "title": self.title,
            "class_names": list(self.class_names),
            "palette": self.palette.tolist(),
            "label_convention": self.label_convention,
            "reduce_zero_label": self.reduce_zero_label,
            "ignore_index": IGNORE_INDEX,
            "own": self.own,
            "card_sha256": self.card_sha256,
        }


_ADE20K_HELP = (
    "ADE20K (SceneParsing challenge release): download ADEChallengeData2016.zip from "
    "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip and put the zip, or the folder "
    "ADEChallengeData2016/ it contains (images/{training,validation}, annotations/{training,validation}), "
    "directly in {raw}."
)
_COCO_HELP = (
    "COCO-Stuff-164k: download train2017.zip and val2017.zip from http://images.cocodataset.org/zips/ and "
    "stuffthingmaps_trainval2017.zip from "
    "http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/stuffthingmaps_trainval2017.zip; "
    "put the three zips directly in {raw}, or extract them as mmsegmentation does: "
    "{raw}/images/{train2017,val2017}/*.jpg and {raw}/annotations/{train2017,val2017}/*.png "
    "(or the converted *_labelTrainIds.png)."
)
_PASCAL_HELP = (
    "Pascal Context 59: download VOCtrainval_03-May-2010.tar from "
    "http://host.robots.ox.ac.uk/pascal/VOC/voc2010/VOCtrainval_03-May-2010.tar and put it in {raw} (or "
    "extract it there: {raw}/VOCdevkit/VOC2010/JPEGImages). For the annotations, download the Detail API's "
    "trainval_merged.json (what mmsegmentation's converter reads) from "
    "https://codalabuser.blob.core.windows.net/public/trainval_merged.json and put it in "
    "{raw}/VOCdevkit/VOC2010/ (mmsegmentation's layout) or directly in {raw}; or download the PASCAL-Context "
    "trainval.tar.gz from https://cs.stanford.edu/~roozbeh/pascal-context/trainval.tar.gz and put it in {raw} "
    "(or extract it there: {raw}/trainval/*.mat). When several are present the JSON is used first, then the "
    ".mat files, then already converted label maps in VOCdevkit/VOC2010/SegmentationClassContext/*.png. "
    "Splits: VOCdevkit/VOC2010/ImageSets/SegmentationContext/{train,val}.txt (as mmsegmentation's converter "
    "writes them) when present, else the JSON's train and val image sets, else VOC2010's ImageSets/Main lists."
)

CATALOG: dict[str, DatasetInfo] = {
    "ade20k": DatasetInfo(
        name="ade20k",
        title="ADE20K (SceneParsing, 150 classes)",
        class_names=ADE20K_CLASSES,
        split_sizes={"train": 20210, "val": 2000},
        raw_encoding="ade20k_raw",
        label_convention="raw 0 (other) -> 255 (ignored); raw k in 1..150 -> k-1 (reduce_zero_label)",
        reduce_zero_label=True,
        download_help=_ADE20K_HELP,
    ),
    "coco_stuff164k": DatasetInfo(
        name="coco_stuff164k",
        title="COCO-Stuff-164k (171 classes)",
        class_names=COCO_STUFF_164K_CLASSES,
        split_sizes={"train": 118287, "val": 5000},
        raw_encoding="coco_stuff_raw",
        label_convention=(
            "stuffthingmaps ids 0..181 without the 11 unused ids (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90), "
            "in increasing order -> 0..170; 255 -> 255 (mmsegmentation coco_stuff164k converter)"
        ),
        reduce_zero_label=False,
        download_help=_COCO_HELP,
    ),
    "pascal_context_59": DatasetInfo(
        name="pascal_context_59",
        title="Pascal Context 59 (59 classes)",
        class_names=PASCAL_CONTEXT_59_CLASSES,
        split_sizes={"train": 4996, "val": 5104},
        raw_encoding="pascal_context_459",
        label_convention=(
            "459-class ids: the 60 kept ids sorted -> 0..59, then background 0 -> 255 (ignored) and k -> k-1 "
            "(mmsegmentation pascal_context converter + reduce_zero_label); an id outside the kept list is an "
            "error in the Detail API JSON (as the converter asserts) and background (255) in the original .mat "
            "LabelMaps, which annotate all 459 classes"
        ),
        reduce_zero_label=True,
        download_help=_PASCAL_HELP,
    ),
}


# the users' dataset cards met in this process (from a card file, a shard index or a checkpoint)
_REGISTERED: dict[str, DatasetInfo] = {}


def is_builtin(name: str) -> bool:
    """Whether ``name`` is one of the three built-in datasets."""
    return name in CATALOG


def check_dataset_name(name: object, *, where: str) -> str:
    """``name`` when it is a plain dataset name that is not a built-in one.

    Raises:
        ValueError: naming ``where``.
    """
    if not isinstance(name, str) or not DATASET_NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"{where}: {name!r} is not a plain dataset name (1-64 letters, digits, '_' or '-', starting with a "
            "letter or digit)"
        )
    if name in CATALOG:
        raise ValueError(f"{where}: {name!r} is a built-in dataset; give your own data another name")
    return name


def register_dataset(info: DatasetInfo) -> DatasetInfo:
    """Make a user's card known to :func:`get_dataset` (a card of the same name met later replaces it).

    Raises:
        ValueError: a built-in name, or a card without classes or with more than :data:`MAX_CLASSES`.
    """
    check_dataset_name(info.name, where="dataset card")
    if not 1 <= info.num_classes <= MAX_CLASSES:
        raise ValueError(f"dataset card {info.name}: {info.num_classes} classes (expected 1..{MAX_CLASSES})")
    _REGISTERED[info.name] = info
    return info


def dataset_from_record(record: Mapping[str, Any], *, source: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of a record written by :meth:`DatasetInfo.to_record`: the built-in card for a
    built-in name, else the user's card it describes, registered (:func:`register_dataset`).

    Raises:
        ValueError: a record that is not one, naming ``source``.
    """
    try:
        name = str(record["name"])
        if name in CATALOG:
            return CATALOG[name]
        names = tuple(str(n) for n in record["class_names"])
        colors = tuple((int(r), int(g), int(b)) for r, g, b in record["palette"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{source}: not a dataset record ({err!r})") from err
    if len(colors) != len(names):
        raise ValueError(f"{source}: dataset {name}: {len(names)} classes but {len(colors)} palette colours")
    info = DatasetInfo(
        name=name,
        title=str(record.get("title") or name),
        class_names=names,
        split_sizes={},
        raw_encoding="card",
        label_convention=str(record.get("label_convention") or ""),
        reduce_zero_label=bool(record.get("reduce_zero_label", False)),
        colors=colors,
        own=True,
        card_sha256=record.get("card_sha256"),
    )
    return register_dataset(info)


def get_dataset(name: str) -> DatasetInfo:
    """Return the catalog entry of ``name`` (a built-in card or a registered user's card); raise
    ``ValueError`` naming the known datasets otherwise."""
    if name in CATALOG:
        return CATALOG[name]
    if name in _REGISTERED:
        return _REGISTERED[name]
    known = ", ".join((*DATASET_NAMES, *_REGISTERED))
    raise ValueError(
        f"unknown dataset {name!r}; known datasets: {known} (your own data: a dataset card, "
        "`vitadapter data init`)"
    )


def make_palette(num_colors: int) -> np.ndarray:
    """Distinct RGB colours, the PASCAL VOC bit-interleaving colour map.

    mmsegmentation ships hand-written palettes; any fixed palette serves visualisation, so one rule is used
    for every dataset (colour ``i`` for train id ``i``).

    Returns:
        ``(num_colors, 3)`` uint8 array.
    """
    palette = np.zeros((num_colors, 3), dtype=np.uint8)
    for index in range(num_colors):
        code, red, green, blue = index + 1, 0, 0, 0  # +1: colour 0 would be black, kept for "no class"
        for bit in range(8):
            red |= ((code >> 0) & 1) << (7 - bit)
            green |= ((code >> 1) & 1) << (7 - bit)
            blue |= ((code >> 2) & 1) << (7 - bit)
            code >>= 3
        palette[index] = (red, green, blue)
    return palette


def _lookup_table(size: int, mapping: dict[int, int]) -> np.ndarray:
    table = np.full(size, _INVALID, dtype=np.int16)
    for raw_id, train_id in mapping.items():
        table[raw_id] = train_id
    return table


def _reduce_zero(label_id: int) -> int:
    return IGNORE_INDEX if label_id == 0 else label_id - 1


_LOOKUP_TABLES: dict[str, np.ndarray] = {
    "ade20k_raw": _lookup_table(256, {k: _reduce_zero(k) for k in range(ADE20K_NUM_RAW_IDS)}),
    "coco_stuff_raw": _lookup_table(
        256,
        {**{raw: train for train, raw in enumerate(COCO_STUFF_RAW_CLASS_IDS)}, IGNORE_INDEX: IGNORE_INDEX},
    ),
    "coco_stuff_train_ids": _lookup_table(
        256, {**{k: k for k in range(len(COCO_STUFF_164K_CLASSES))}, IGNORE_INDEX: IGNORE_INDEX}
    ),
    "pascal_context_459": _lookup_table(
        PASCAL_CONTEXT_NUM_RAW_CLASSES + 1,
        {raw: _reduce_zero(index) for index, raw in enumerate(PASCAL_CONTEXT_KEPT_IDS)},
    ),
    # the original PASCAL-Context .mat LabelMaps annotate all 459 classes: in the 59-class task every id
    # outside the kept list is background, which is ignored
    "pascal_context_459_full": _lookup_table(
        PASCAL_CONTEXT_NUM_RAW_CLASSES + 1,
        {
            **{raw: IGNORE_INDEX for raw in range(PASCAL_CONTEXT_NUM_RAW_CLASSES + 1)},
            **{raw: _reduce_zero(index) for index, raw in enumerate(PASCAL_CONTEXT_KEPT_IDS)},
        },
    ),
    "pascal_context_59": _lookup_table(
        256, {k: _reduce_zero(k) for k in range(len(PASCAL_CONTEXT_59_CLASSES) + 1)}
    ),
}


def lookup_table(encoding: LabelEncoding) -> np.ndarray:
    """Raw id to train id table of ``encoding``: int16, ``-1`` where the raw id is not in the encoding."""
    if encoding not in _LOOKUP_TABLES:
        raise ValueError(f"unknown label encoding {encoding!r}; known: {', '.join(_LOOKUP_TABLES)}")
    return _LOOKUP_TABLES[encoding]


def to_train_ids(raw: np.ndarray, encoding: LabelEncoding, *, source: str) -> np.ndarray:
    """Convert a raw label map to train ids.

    Args:
        raw: ``(H, W)`` integer label map as distributed (uint8, or uint16 for ``pascal_context_459``).
        encoding: the raw encoding, see the module docstring.
        source: file name used in error messages.

    Returns:
        ``(H, W)`` uint8 map of train ids in ``[0, num_classes)`` and 255.

    Raises:
        LabelError: when ``raw`` is not 2-D integer, or holds an id outside the encoding.
    """
    if raw.ndim != 2 or not np.issubdtype(raw.dtype, np.integer):
        raise LabelError(
            f"{source}: a label map must be a single-channel integer image, got shape {raw.shape} {raw.dtype}"
        )
    table = lookup_table(encoding)
    if raw.size and (int(raw.min()) < 0 or int(raw.max()) >= len(table)):
        bad = np.unique(raw[(raw < 0) | (raw >= len(table))])
        raise LabelError(f"{source}: label ids {bad[:10].tolist()} are outside the {encoding} encoding")
    converted = table[raw]
    invalid = converted == _INVALID
    if invalid.any():
        bad = np.unique(raw[invalid])
        raise LabelError(f"{source}: label ids {bad[:10].tolist()} are outside the {encoding} encoding")
    return converted.astype(np.uint8)


def raw_ids_of_train_ids(encoding: LabelEncoding, train_ids: list[int] | tuple[int, ...]) -> list[int]:
    """Inverse conversion: the raw id of each train id (used by the synthetic twin).

    Raises:
        ValueError: when a train id has no raw id in ``encoding``.
    """
    table = lookup_table(encoding)
    inverse = {int(train): raw for raw, train in enumerate(table.tolist()) if train != _INVALID}
    missing = [t for t in train_ids if t not in inverse]
    if missing:
        raise ValueError(f"train ids {missing} have no raw id in the {encoding} encoding")
    return [inverse[t] for t in train_ids]


def check_train_ids(label: np.ndarray, num_classes: int, *, source: str) -> None:
    """Raise :class:`LabelError` naming ``source`` if ``label`` holds a value outside ``[0, num_classes) ∪ {255}``.

    Args:
        label: ``(H, W)`` uint8 map of train ids.
        num_classes: number of classes of the dataset.
        source: file (or shard member) name used in the message.
    """
    if label.ndim != 2 or label.dtype != np.uint8:
        raise LabelError(
            f"{source}: expected a (H, W) uint8 train-id map, got shape {label.shape} {label.dtype}"
        )
    counts = np.bincount(label.ravel(), minlength=256)
    bad = [v for v in np.flatnonzero(counts).tolist() if v >= num_classes and v != IGNORE_INDEX]
    if bad:
        raise LabelError(
            f"{source}: train ids {bad[:10]} are outside [0, {num_classes}) and the ignore index {IGNORE_INDEX}"
        )
