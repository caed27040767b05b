"""Readers of the official distributions of ADE20K, COCO-Stuff-164k and Pascal Context 59.

Each reader finds a dataset below a ``raw`` folder, in the layouts listed by the catalog's ``download_help``
(the archives as downloaded, the folders they extract to, or mmsegmentation's ``data/`` layout), and lists
its samples per split as :class:`RawSample` values: where the image and the label map live and how the label
map is encoded (``docs/reference.md`` §D). :func:`load_sample` reads one sample, checks it and
converts its label map to train ids.

Images are decoded as the reference's ``LoadImageFromFile`` does (OpenCV, colour, BGR uint8); label maps as
its ``LoadAnnotations`` does (Pillow, values unchanged: palette indices for palette PNGs), ``.mat`` files with
scipy (``LabelMap``), and the Detail API's ``trainval_merged.json`` as its ``getMask`` does
(:mod:`data.pascal_detail`).
"""

from __future__ import annotations

import io
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import scipy.io
from PIL import Image

from data.catalog import SPLITS, DatasetName, LabelEncoding, LabelError, Split, get_dataset, to_train_ids
from data.pascal_detail import (
    DETAIL_JSON,
    DetailAnnotations,
    DetailFormatError,
    find_detail_json,
    load_detail_annotations,
)
from data.sources import SourceSpec, archive_kind, open_source

log = logging.getLogger(__name__)

JPEG_START = b"\xff\xd8"
JPEG_END = b"\xff\xd9"
# A JPEG's end-of-image marker must lie in its last bytes; missing, the file was cut short.
JPEG_END_WINDOW = 1024
MAT_LABEL_KEY = "LabelMap"


class CorruptFileError(ValueError):
    """A raw image or label file cannot be decoded (or is missing, or disagrees with its pair)."""


class DatasetNotFoundError(FileNotFoundError):
    """A dataset (or one of its parts) is not where the reader looks for it."""


@dataclass(frozen=True)
class FileRef:
    """One file of a source."""

    source: SourceSpec
    name: str

    def describe(self) -> str:
        """Path (or ``archive:member``) of the file, for messages."""
        return self.source.describe(self.name)

    def read(self) -> bytes:
        """The file's bytes."""
        return open_source(self.source).read(self.name)

    def size(self) -> int:
        """The file's size in bytes."""
        return open_source(self.source).size(self.name)


@dataclass(frozen=True)
class RawSample:
    """One image and its label map as distributed.

    Attributes:
        key: sample name (the image file stem), unique within the dataset.
        split: ``train`` or ``val``.
        image: the image file (JPEG).
        label: the label map file (PNG or ``.mat``), or the ``trainval_merged.json`` holding the sample's
            annotations (the image is then ``key``).
        encoding: raw encoding of the label map.
    """

    key: str
    split: Split
    image: FileRef
    label: FileRef
    encoding: LabelEncoding


@dataclass(frozen=True)
class LoadedSample:
    """A checked sample: original image bytes, decoded image and train-id label map.

    Attributes:
        sample: where it came from.
        image_bytes: the image file's bytes, unchanged.
        image: ``(H, W, 3)`` uint8 BGR.
        label: ``(H, W)`` uint8 train ids.
    """

    sample: RawSample
    image_bytes: bytes
    image: np.ndarray
    label: np.ndarray


def decode_image(data: bytes, *, source: str) -> np.ndarray:
    """Decode an image as ``cv2.imdecode(..., IMREAD_COLOR)``: ``(H, W, 3)`` uint8 BGR.

    A JPEG whose end-of-image marker is not among its last bytes is either cut short (corrupt) or followed
    by trailing bytes (valid: some cameras and editors append data); Pillow's strict decoder tells which.

    Raises:
        CorruptFileError: naming ``source`` when the bytes are empty or do not decode, or a JPEG is cut short.
    """
    if not data:
        raise CorruptFileError(f"{source}: empty file (0 bytes)")
    if (
        data.startswith(JPEG_START)
        and JPEG_END not in data[-JPEG_END_WINDOW:]
        and not _jpeg_is_complete(data)
    ):
        raise CorruptFileError(f"{source}: corrupt image (JPEG without its end marker, file cut short?)")
    try:
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as err:
        raise CorruptFileError(f"{source}: corrupt image ({str(err).strip().splitlines()[-1]})") from err
    if image is None:
        raise CorruptFileError(f"{source}: corrupt image (cannot be decoded)")
    return image


def _jpeg_is_complete(data: bytes) -> bool:
    """Whether Pillow decodes the whole JPEG (a truncated one raises; trailing bytes after it are fine)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError):
        return False
    return True


def decode_label_image(data: bytes, *, source: str) -> np.ndarray:
    """Decode a label PNG as the reference does (Pillow, values unchanged): ``(H, W)`` integer ids.

    Raises:
        CorruptFileError: naming ``source`` when the bytes do not decode.
        LabelError: when the image is not single-channel.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            mode = image.mode
            array = np.array(image)
    except Image.DecompressionBombError as err:
        raise CorruptFileError(
            f"{source}: label map too large to decode safely ({err}); a decompression bomb, not a label map?"
        ) from err
    except (OSError, SyntaxError, ValueError, EOFError, zlib.error) as err:
        raise CorruptFileError(f"{source}: corrupt label map ({err})") from err
    if array.ndim != 2:
        raise LabelError(f"{source}: a label map must be single-channel, got Pillow mode {mode!r}")
    return array


def decode_label_mat(data: bytes, *, source: str) -> np.ndarray:
    """Read ``LabelMap`` from a PASCAL-Context ``.mat`` file: ``(H, W)`` integer ids.

    Raises:
        CorruptFileError: naming ``source`` when the file does not parse or has no ``LabelMap``.
    """
    try:
        content = scipy.io.loadmat(io.BytesIO(data))
    except (ValueError, TypeError, OSError, EOFError, zlib.error, scipy.io.matlab.MatReadError) as err:
        raise CorruptFileError(f"{source}: corrupt .mat label file ({err})") from err
    if MAT_LABEL_KEY not in content:
        raise CorruptFileError(f"{source}: .mat label file without a {MAT_LABEL_KEY!r} variable")
    return np.asarray(content[MAT_LABEL_KEY])


def load_sample(sample: RawSample) -> LoadedSample:
    """Read, decode and check one sample; convert its label map to train ids.

    Raises:
        CorruptFileError: an unreadable or missing file, or image and label of different sizes.
        LabelError: a label id outside the sample's encoding.
    """
    from_json = is_detail_json(sample.label)
    try:
        image_bytes = sample.image.read()
        label_bytes = b"" if from_json else sample.label.read()
    except FileNotFoundError as err:
        raise CorruptFileError(str(err)) from err
    image = decode_image(image_bytes, source=sample.image.describe())
    if from_json:
        label_source = f"{sample.label.describe()} (image {sample.key})"
        raw = _detail_label_map(sample.label, sample.key)
    else:
        label_source = sample.label.describe()
        raw = _decode_label_file(label_bytes, sample.label.name, source=label_source)
    if raw.shape != image.shape[:2]:
        raise CorruptFileError(
            f"{label_source}: label map size {raw.shape} differs from image size {image.shape[:2]} "
            f"of {sample.image.describe()}"
        )
    label = to_train_ids(raw, sample.encoding, source=label_source)
    return LoadedSample(sample=sample, image_bytes=image_bytes, image=image, label=label)


def is_detail_json(label: FileRef) -> bool:
    """Whether ``label`` is a Detail API annotation file (rather than one label map)."""
    return label.name.endswith(".json")


def _detail_label_map(label: FileRef, key: str) -> np.ndarray:
    """The 459-class map of image ``key`` in the Detail API file ``label`` (errors as corrupt files)."""
    try:
        return load_detail_annotations(label.source, label.name).label_map(key)
    except (FileNotFoundError, DetailFormatError) as err:
        raise CorruptFileError(str(err)) from err


def _decode_label_file(data: bytes, name: str, *, source: str) -> np.ndarray:
    if name.endswith(".mat"):
        return decode_label_mat(data, source=source)
    return decode_label_image(data, source=source)


def _candidate(path: Path, prefix: str = "") -> SourceSpec | None:
    """A source for ``path`` (folder or archive) when it exists."""
    if path.is_dir():
        return SourceSpec("dir", str(path), prefix)
    kind = archive_kind(path)
    if kind is not None and path.is_file():
        return SourceSpec(kind, str(path), prefix)
    return None


def _first_with(candidates: list[SourceSpec | None], folder: str) -> SourceSpec | None:
    """The first existing candidate that holds ``folder``."""
    for spec in candidates:
        if spec is not None and open_source(spec).is_dir(folder):
            return spec
    return None


def _missing(dataset: DatasetName, raw: Path, what: str) -> DatasetNotFoundError:
    info = get_dataset(dataset)
    return DatasetNotFoundError(
        f"{info.title}: {what} not found under {raw}. {info.download_instructions(raw)}"
    )


def _stems(names: list[str], suffix: str) -> dict[str, str]:
    """Map file stem to name for the names ending in ``suffix`` (case-insensitive)."""
    return {Path(n).name[: -len(suffix)]: n for n in names if n.lower().endswith(suffix.lower())}


# ---------------------------------------------------------------------------------------------------- ADE20K
ADE20K_FOLDER = "ADEChallengeData2016"
ADE20K_SPLIT_FOLDERS: dict[str, str] = {"train": "training", "val": "validation"}


def _ade20k_samples(raw: Path, split: Split) -> list[RawSample]:
    folder = ADE20K_SPLIT_FOLDERS[split]
    root = _first_with(
        [
            _candidate(raw / ADE20K_FOLDER),
            _candidate(raw),
            _candidate(raw / f"{ADE20K_FOLDER}.zip", ADE20K_FOLDER),
            _candidate(raw, ADE20K_FOLDER),
        ],
        f"images/{folder}",
    )
    if root is None:
        raise _missing("ade20k", raw, f"images/{folder}")
    source = open_source(root)
    images = _stems(source.list(f"images/{folder}"), ".jpg")
    labels = _stems(source.list(f"annotations/{folder}"), ".png")
    return [
        RawSample(
            key=stem,
            split=split,
            image=FileRef(root, images[stem]),
            label=FileRef(root, labels.get(stem, f"annotations/{folder}/{stem}.png")),
            encoding="ade20k_raw",
        )
        for stem in sorted(images)
    ]


# ----------------------------------------------------------------------------------------- COCO-Stuff-164k
COCO_SPLIT_FOLDERS: dict[str, str] = {"train": "train2017", "val": "val2017"}
COCO_STUFF_ARCHIVE = "stuffthingmaps_trainval2017"
COCO_TRAIN_IDS_SUFFIX = "_labelTrainIds.png"


def _coco_samples(raw: Path, split: Split) -> list[RawSample]:
    folder = COCO_SPLIT_FOLDERS[split]
    image_root = _first_with(
        [_candidate(raw / "images"), _candidate(raw / f"{folder}.zip"), _candidate(raw)], folder
    )
    if image_root is None or not any(n.endswith(".jpg") for n in open_source(image_root).list(folder)):
        raise _missing("coco_stuff164k", raw, f"the {folder} images")
    label_root = _first_with(
        [
            _candidate(raw / "annotations"),
            _candidate(raw / COCO_STUFF_ARCHIVE),
            _candidate(raw / f"{COCO_STUFF_ARCHIVE}.zip"),
            _candidate(raw / f"{COCO_STUFF_ARCHIVE}.zip", COCO_STUFF_ARCHIVE),
            _candidate(raw),
        ],
        folder,
    )
    if label_root is None:
        raise _missing("coco_stuff164k", raw, f"the {folder} stuffthingmaps label maps")
    images = _stems(open_source(image_root).list(folder), ".jpg")
    label_names = open_source(label_root).list(folder)
    converted = _stems(label_names, COCO_TRAIN_IDS_SUFFIX)
    raw_maps = {s: n for s, n in _stems(label_names, ".png").items() if not n.endswith(COCO_TRAIN_IDS_SUFFIX)}
    samples = []
    for stem in sorted(images):
        # Prefer the distributed stuffthingmaps; fall back to mmsegmentation's converted maps.
        if stem in raw_maps or stem not in converted:
            label = FileRef(label_root, raw_maps.get(stem, f"{folder}/{stem}.png"))
            encoding: LabelEncoding = "coco_stuff_raw"
        else:
            label, encoding = FileRef(label_root, converted[stem]), "coco_stuff_train_ids"
        samples.append(RawSample(stem, split, FileRef(image_root, images[stem]), label, encoding))
    return samples


# --------------------------------------------------------------------------------------- Pascal Context 59
VOC_ROOT = "VOCdevkit/VOC2010"
VOC_ARCHIVE = "VOCtrainval_03-May-2010.tar"
PASCAL_CONTEXT_MAT_FOLDER = "trainval"
PASCAL_CONTEXT_ARCHIVE = "trainval.tar.gz"
PASCAL_CONTEXT_PNG_FOLDER = "SegmentationClassContext"
PASCAL_CONTEXT_SPLIT_FOLDER = "ImageSets/SegmentationContext"
VOC_MAIN_SPLIT_FOLDER = "ImageSets/Main"


def _pascal_split_ids(
    voc: SourceSpec, split: Split, annotated: set[str], detail: DetailAnnotations | None
) -> list[str]:
    """Split membership: the SegmentationContext list, else the Detail API's image set, else VOC's Main list."""
    source = open_source(voc)
    context_list = f"{PASCAL_CONTEXT_SPLIT_FOLDER}/{split}.txt"
    if source.exists(context_list):
        return sorted(set(source.read(context_list).decode().split()))
    if detail is not None:
        # What mmsegmentation's converter writes into that list: the images of the JSON's phase.
        return detail.keys_in_phase(split)
    main_list = f"{VOC_MAIN_SPLIT_FOLDER}/{split}.txt"
    if not source.exists(main_list):
        raise DatasetNotFoundError(
            f"Pascal Context 59: no split list {voc.describe(context_list)} nor {voc.describe(main_list)}"
        )
    ids = sorted({i for i in source.read(main_list).decode().split() if i in annotated})
    log.warning(
        "%s is missing: using VOC2010's %s restricted to annotated images (%d images; the converter's "
        "split has %d)",
        voc.describe(context_list),
        main_list,
        len(ids),
        get_dataset("pascal_context_59").split_sizes[split],
    )
    return ids


def _pascal_detail(raw: Path, voc: SourceSpec) -> tuple[SourceSpec | None, DetailAnnotations | None]:
    """The Detail API's ``trainval_merged.json``, parsed, where mmsegmentation's docs put it or beside VOCdevkit."""
    spec = find_detail_json(
        [voc, _candidate(raw / "VOCdevkit" / "VOC2010"), _candidate(raw / "VOCdevkit"), _candidate(raw)]
    )
    if spec is None:
        return None, None
    try:
        return spec, load_detail_annotations(spec, DETAIL_JSON)
    except DetailFormatError as err:
        raise CorruptFileError(str(err)) from err


def _pascal_samples(raw: Path, split: Split) -> list[RawSample]:
    """Pascal Context samples of ``split``.

    Label sources, in this order of precedence (per image, the first that annotates it): the Detail API's
    ``trainval_merged.json`` (what mmsegmentation's converter reads), the PASCAL-Context ``trainval/*.mat``
    files, mmsegmentation's converted ``SegmentationClassContext/*.png``. Split membership: the
    ``ImageSets/SegmentationContext`` lists when present, else the JSON's image sets (``phase``), else VOC's
    ``ImageSets/Main`` lists restricted to annotated images.
    """
    voc = _first_with(
        [
            _candidate(raw / "VOCdevkit" / "VOC2010"),
            _candidate(raw / "VOC2010"),
            _candidate(raw),
            _candidate(raw / VOC_ARCHIVE, VOC_ROOT),
        ],
        "JPEGImages",
    )
    if voc is None:
        raise _missing("pascal_context_59", raw, "VOCdevkit/VOC2010/JPEGImages")
    detail_root, detail = _pascal_detail(raw, voc)
    mat_root = _first_with(
        [
            _candidate(raw),
            _candidate(raw / PASCAL_CONTEXT_ARCHIVE),
            voc if voc.kind == "dir" else None,
        ],
        PASCAL_CONTEXT_MAT_FOLDER,
    )
    mats = _stems(open_source(mat_root).list(PASCAL_CONTEXT_MAT_FOLDER), ".mat") if mat_root else {}
    pngs = _stems(open_source(voc).list(PASCAL_CONTEXT_PNG_FOLDER), ".png")
    in_json = set(detail.images) if detail is not None else set()
    if not in_json and not mats and not pngs:
        raise _missing(
            "pascal_context_59", raw, f"the PASCAL-Context annotations ({DETAIL_JSON} or trainval/*.mat)"
        )
    images = _stems(open_source(voc).list("JPEGImages"), ".jpg")
    samples = []
    for image_id in _pascal_split_ids(voc, split, in_json | set(mats) | set(pngs), detail):
        image = FileRef(voc, images.get(image_id, f"JPEGImages/{image_id}.jpg"))
        encoding: LabelEncoding = "pascal_context_459"
        if detail_root is not None and (image_id in in_json or not (mats or pngs)):
            label = FileRef(detail_root, DETAIL_JSON)  # an image missing from it is reported when loaded
        elif image_id in mats or not pngs:
            label = FileRef(
                mat_root or voc, mats.get(image_id, f"{PASCAL_CONTEXT_MAT_FOLDER}/{image_id}.mat")
            )
            encoding = "pascal_context_459_full"
        else:
            label = FileRef(voc, pngs.get(image_id, f"{PASCAL_CONTEXT_PNG_FOLDER}/{image_id}.png"))
            encoding = "pascal_context_59"
        samples.append(RawSample(image_id, split, image, label, encoding))
    return samples


_FINDERS = {"ade20k": _ade20k_samples, "coco_stuff164k": _coco_samples, "pascal_context_59": _pascal_samples}


def find_samples(dataset: DatasetName, raw: str | Path, split: Split) -> list[RawSample]:
    """List the samples of one split of a dataset found below ``raw``, sorted by key.

    Args:
        dataset: catalog name.
        raw: folder holding the downloaded archives or their extracted folders (or an archive itself).
        split: ``train`` or ``val``.

    Raises:
        DatasetNotFoundError: naming the files to download and where to put them.
        ValueError: unknown dataset or split.
    """
    get_dataset(dataset)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    raw = Path(raw)
    if not raw.exists():
        info = get_dataset(dataset)
        raise DatasetNotFoundError(f"{info.title}: {raw} does not exist. {info.download_instructions(raw)}")
    samples = _FINDERS[dataset](raw, split)
    if not samples:
        raise _missing(dataset, raw, f"any {split} image")
    return samples
