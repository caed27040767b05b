"""Synthetic twins of the three datasets, in exactly their distributed formats.

A twin has the official folder and file naming and raw label encodings, so the readers, ``prepare`` and the
loaders run unchanged on it (tests, demo, benchmarks):

* ``ade20k``: ``ADEChallengeData2016/images/{training,validation}/ADE_{train,val}_%08d.jpg`` and
  ``annotations/...png`` holding raw ids (0 "other", 1..150).
* ``coco_stuff164k``: mmsegmentation's layout of the extracted zips, ``images/{train2017,val2017}/%012d.jpg``
  and ``annotations/{train2017,val2017}/%012d.png`` holding stuffthingmaps ids (0..181 without the unused
  ids, 255 unlabeled).
* ``pascal_context_59``: ``VOCdevkit/VOC2010/JPEGImages/<id>.jpg`` and, with ``label_format="mat"`` (the
  default), the PASCAL-Context ``trainval/<id>.mat`` files with a uint16 ``LabelMap`` of 459-class ids (only
  kept ids, 0 background) and the split lists ``VOCdevkit/VOC2010/ImageSets/SegmentationContext/
  {train,val}.txt``; with ``label_format="detail_json"``, the Detail API's
  ``VOCdevkit/VOC2010/trainval_merged.json`` instead (images with their ``phase``, one run-length encoded
  region annotation per painted layer of the scene, in painting order, see :mod:`data.pascal_detail`) and no
  split lists, as downloaded. Both formats give the same images and labels for the same seed.

Scenes are learnable: a background region and several shapes (rectangles, ellipses, triangles), each of one
class, and every class has its own fixed appearance (a colour and an oriented stripe texture that depend on the
class alone, not on the seed), plus mild noise. Some scenes hold an unlabelled region (raw "other" /
unlabeled / background), which becomes ignore (255). Everything is deterministic given ``seed``.
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import scipy.io
from tqdm import tqdm

from data.atomic import atomic_directory
from data.catalog import IGNORE_INDEX, DatasetName, get_dataset, raw_ids_of_train_ids
from data.class_names import PASCAL_CONTEXT_59_CLASSES
from data.pascal_detail import DETAIL_JSON, encode_rle

log = logging.getLogger(__name__)

JPEG_QUALITY = 95
NOISE_SIGMA = 6.0
TEXTURE_AMPLITUDE = 28.0
GOLDEN_RATIO_CONJUGATE = 0.6180339887498949
IGNORE_REGION_PROBABILITY = 0.5
MIN_SHAPE_FRACTION = 0.15
MAX_SHAPE_FRACTION = 0.6
# MAT-file v5 header: 116 bytes of text (scipy writes the creation time there); fixed for reproducible files.
MAT_HEADER_TEXT_BYTES = 116
MAT_HEADER_TEXT = b"MATLAB 5.0 MAT-file, written by the vitadapter synthetic twin"
SPLIT_SALT = {"train": 0, "val": 1}
PascalLabelFormat = Literal["mat", "detail_json"]
PASCAL_LABEL_FORMATS: tuple[PascalLabelFormat, ...] = ("mat", "detail_json")
VOC_FOLDER = "VOCdevkit/VOC2010"


@dataclass(frozen=True)
class TwinReport:
    """What :func:`synthesize` wrote: the twin's root (the ``--raw`` of ``prepare``), counts and classes."""

    root: Path
    dataset: DatasetName
    counts: dict[str, int]
    train_ids: tuple[int, ...]


@dataclass(frozen=True)
class ClassAppearance:
    """Fixed look of one class: BGR base colour and an oriented stripe texture."""

    colour: tuple[float, float, float]
    angle: float
    period: float


def class_appearance(train_id: int) -> ClassAppearance:
    """Appearance of ``train_id``; it depends on the class only, so train and val images agree."""
    hue = (train_id * GOLDEN_RATIO_CONJUGATE) % 1.0
    saturation = 0.85 if train_id % 2 == 0 else 0.55
    value = 0.9 if (train_id // 2) % 2 == 0 else 0.6
    hsv = np.array([[[hue * 180.0, saturation * 255.0, value * 255.0]]], dtype=np.float32)
    bgr = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2BGR)[0, 0].astype(float)
    angle = math.radians((train_id * 47) % 180)
    period = 5.0 + (train_id * 7) % 13
    return ClassAppearance(colour=(bgr[0], bgr[1], bgr[2]), angle=angle, period=period)


def _draw_shape(canvas: np.ndarray, value: int, rng: np.random.Generator) -> None:
    height, width = canvas.shape
    size_h = int(height * rng.uniform(MIN_SHAPE_FRACTION, MAX_SHAPE_FRACTION))
    size_w = int(width * rng.uniform(MIN_SHAPE_FRACTION, MAX_SHAPE_FRACTION))
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    kind = int(rng.integers(0, 3))
    if kind == 0:
        cv2.rectangle(
            canvas, (cx - size_w // 2, cy - size_h // 2), (cx + size_w // 2, cy + size_h // 2), value, -1
        )
    elif kind == 1:
        angle = float(rng.uniform(0, 180))
        cv2.ellipse(canvas, (cx, cy), (max(size_w // 2, 1), max(size_h // 2, 1)), angle, 0, 360, value, -1)
    else:
        points = np.stack(
            [cx + rng.integers(-size_w, size_w + 1, 3), cy + rng.integers(-size_h, size_h + 1, 3)], axis=1
        )
        cv2.fillPoly(canvas, [points.astype(np.int32)], value)


def _paint_shape(
    label: np.ndarray, value: int, rng: np.random.Generator, layers: list[tuple[int, np.ndarray]] | None
) -> None:
    """Draw one shape of ``value`` into ``label``; record its full (unoccluded) mask in ``layers``."""
    if layers is None:
        _draw_shape(label, value, rng)
        return
    mask = np.zeros(label.shape, dtype=np.uint8)
    _draw_shape(mask, 1, rng)  # same random draws and pixels as drawing into ``label`` directly
    label[mask == 1] = value
    layers.append((value, mask == 1))


def make_scene(
    height: int,
    width: int,
    train_ids: Sequence[int],
    rng: np.random.Generator,
    *,
    max_shapes: int = 6,
    layers: list[tuple[int, np.ndarray]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one scene.

    Args:
        height: image height.
        width: image width.
        train_ids: classes to draw from (train ids).
        rng: random generator (consumed).
        max_shapes: most shapes drawn over the background.
        layers: when given, receives ``(train id, (H, W) bool mask)`` of each painted layer (the background,
            then every shape, 255 for the unlabelled one) in painting order; the result does not change.

    Returns:
        ``(image (H, W, 3) uint8 BGR, label (H, W) uint8 train ids with 255 for unlabelled pixels)``.
    """
    background = int(train_ids[int(rng.integers(0, len(train_ids)))])
    label = np.full((height, width), background, dtype=np.uint8)
    if layers is not None:
        layers.append((background, np.ones((height, width), dtype=bool)))
    for _ in range(int(rng.integers(2, max(max_shapes, 2) + 1))):
        _paint_shape(label, int(train_ids[int(rng.integers(0, len(train_ids)))]), rng, layers)
    if rng.random() < IGNORE_REGION_PROBABILITY:
        _paint_shape(label, IGNORE_INDEX, rng, layers)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.empty((height, width, 3), dtype=np.float32)
    image[:] = 127.0  # unlabelled regions stay grey (plus noise)
    for class_id in np.unique(label).tolist():
        if class_id == IGNORE_INDEX:
            continue
        look = class_appearance(class_id)
        mask = label == class_id
        phase = (xs[mask] * math.cos(look.angle) + ys[mask] * math.sin(look.angle)) * (
            2 * math.pi / look.period
        )
        stripes = (TEXTURE_AMPLITUDE * np.sin(phase))[:, None]
        image[mask] = np.asarray(look.colour, dtype=np.float32)[None, :] + stripes
    image += rng.normal(0.0, NOISE_SIGMA, size=image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8), label


def _encode_jpeg(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return data.tobytes()


def _encode_png(raw: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", raw)
    if not ok:
        raise ValueError("PNG encoding failed")
    return data.tobytes()


def encode_label_mat(raw: np.ndarray) -> bytes:
    """A PASCAL-Context style ``.mat`` file with ``LabelMap`` (uint16), byte-identical across runs."""
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, {"LabelMap": raw.astype(np.uint16)}, do_compression=True)
    data = bytearray(buffer.getvalue())
    data[:MAT_HEADER_TEXT_BYTES] = MAT_HEADER_TEXT.ljust(MAT_HEADER_TEXT_BYTES, b" ")
    return bytes(data)


def _mask_bbox(mask: np.ndarray) -> list[int]:
    """COCO ``[x, y, width, height]`` of a non-empty mask."""
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    return [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1]


class _DetailJsonWriter:
    """Collects a twin's images and layers into the Detail API's ``trainval_merged.json``."""

    def __init__(self, to_raw: np.ndarray) -> None:
        self._to_raw = to_raw
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []

    def add(self, key: str, phase: str, label: np.ndarray, layers: list[tuple[int, np.ndarray]]) -> None:
        """Add image ``key`` whose painted ``layers`` (train ids, in order) make ``label``.

        Each labelled layer becomes one annotation of its full mask minus the pixels left unlabelled in the
        end (no annotation may cover them: ``getMask`` would paint them), so that painting the annotations in
        order, later over earlier, gives back ``label`` exactly, overlaps included.
        """
        height, width = label.shape
        image_id = int(key.replace("_", ""))
        self.images.append(
            {
                "image_id": image_id,
                "file_name": f"{key}.jpg",
                "height": height,
                "width": width,
                "phase": phase,
            }
        )
        unlabelled = label == IGNORE_INDEX
        for train_id, layer in layers:
            if train_id == IGNORE_INDEX:
                continue
            mask = layer & ~unlabelled
            if not mask.any():
                continue
            self.annotations.append(
                {
                    "id": len(self.annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(self._to_raw[train_id]),
                    "segmentation": encode_rle(mask),
                    "area": int(mask.sum()),
                    "bbox": _mask_bbox(mask),
                    "iscrowd": 0,
                    "parts": [],
                }
            )

    def to_bytes(self) -> bytes:
        """The JSON file (deterministic: fixed key order, no timestamps)."""
        kept = raw_ids_of_train_ids("pascal_context_459", list(range(len(PASCAL_CONTEXT_59_CLASSES))))
        content = {
            "info": {"description": "synthetic twin of the PASCAL-Context trainval_merged.json (vitadapter)"},
            "images": sorted(self.images, key=lambda image: image["image_id"]),
            "categories": [
                {"category_id": raw_id, "name": name, "parts": []}
                for raw_id, name in zip(kept, PASCAL_CONTEXT_59_CLASSES, strict=True)
            ],
            "parts": [],
            "annos_segmentation": self.annotations,
            "annos_occlusion": [],
            "annos_boundary": [],
            "annos_joints": [],
        }
        return json.dumps(content, separators=(",", ":")).encode()


def _raw_lookup(dataset: DatasetName, train_ids: Sequence[int]) -> np.ndarray:
    """Train id to raw id (uint16 table of 256 entries) for the ids used, ignore included."""
    encoding = get_dataset(dataset).raw_encoding
    wanted = [*train_ids, IGNORE_INDEX]
    table = np.zeros(256, dtype=np.uint16)
    table[wanted] = raw_ids_of_train_ids(encoding, wanted)
    return table


def _names(dataset: DatasetName, split: str, index: int) -> tuple[str, str, str]:
    """``(key, image path, label path)`` relative to the twin root, following the official naming."""
    if dataset == "ade20k":
        folder = {"train": "training", "val": "validation"}[split]
        key = f"ADE_{split}_{index + 1:08d}"
        base = "ADEChallengeData2016"
        return key, f"{base}/images/{folder}/{key}.jpg", f"{base}/annotations/{folder}/{key}.png"
    if dataset == "coco_stuff164k":
        folder = {"train": "train2017", "val": "val2017"}[split]
        key = f"{index + 1 + (0 if split == 'train' else 500000):012d}"
        return key, f"images/{folder}/{key}.jpg", f"annotations/{folder}/{key}.png"
    year = {"train": 2008, "val": 2010}[split]
    key = f"{year}_{index + 1:06d}"
    return key, f"VOCdevkit/VOC2010/JPEGImages/{key}.jpg", f"trainval/{key}.mat"


def resolve_train_ids(
    dataset: DatasetName, classes: Sequence[int] | None = None, num_classes_used: int | None = None
) -> tuple[int, ...]:
    """The train ids a twin draws from: ``classes`` if given, else the first ``num_classes_used``, else all.

    Raises:
        ValueError: naming a class outside the dataset or a bad count.
    """
    num_classes = get_dataset(dataset).num_classes
    if classes is not None:
        bad = [c for c in classes if not 0 <= c < num_classes]
        if bad or not classes:
            raise ValueError(
                f"classes must be non-empty train ids in [0, {num_classes}), got {list(classes)}"
            )
        return tuple(sorted(set(int(c) for c in classes)))
    count = num_classes if num_classes_used is None else num_classes_used
    if not 1 <= count <= num_classes:
        raise ValueError(f"num_classes_used must be in [1, {num_classes}], got {num_classes_used}")
    return tuple(range(count))


def synthesize(
    dataset: DatasetName,
    out: str | Path,
    *,
    num_train: int = 16,
    num_val: int = 4,
    seed: int = 0,
    min_size: int = 256,
    max_size: int = 512,
    classes: Sequence[int] | None = None,
    num_classes_used: int | None = None,
    max_shapes: int = 6,
    label_format: PascalLabelFormat = "mat",
    force: bool = False,
) -> TwinReport:
    """Write a synthetic twin of ``dataset`` into ``out`` (replaced atomically).

    Args:
        dataset: catalog name.
        out: destination folder; it becomes the ``--raw`` folder of ``vitadapter data prepare``.
        num_train: training images.
        num_val: validation images.
        seed: everything (sizes, scenes, noise) follows from it.
        min_size: smallest image side.
        max_size: largest image side.
        classes: train ids that may appear (default: see ``num_classes_used``).
        num_classes_used: use train ids ``0 .. num_classes_used - 1`` (default: all classes).
        max_shapes: most shapes per scene.
        label_format: Pascal Context only: ``mat`` (PASCAL-Context ``trainval/*.mat`` and the
            SegmentationContext split lists) or ``detail_json`` (the Detail API's ``trainval_merged.json``,
            splits as its image sets).
        force: replace ``out`` even when vitadapter did not write it (otherwise refused).

    Returns:
        A :class:`TwinReport`.
    """
    info = get_dataset(dataset)
    if num_train < 1 or num_val < 1:
        raise ValueError(f"num_train and num_val must be >= 1, got {num_train} and {num_val}")
    if not 8 <= min_size <= max_size:
        raise ValueError(f"need 8 <= min_size <= max_size, got {min_size} and {max_size}")
    if label_format not in PASCAL_LABEL_FORMATS:
        raise ValueError(f"label_format must be one of {PASCAL_LABEL_FORMATS}, got {label_format!r}")
    if label_format != "mat" and dataset != "pascal_context_59":
        raise ValueError(f"label_format {label_format!r} exists for pascal_context_59 only, not {dataset}")
    train_ids = resolve_train_ids(dataset, classes, num_classes_used)
    to_raw = _raw_lookup(dataset, train_ids)
    detail = _DetailJsonWriter(to_raw) if label_format == "detail_json" else None
    out = Path(out)
    counts = {"train": num_train, "val": num_val}
    with atomic_directory(out, writer="vitadapter data synthesize", force=force) as staging:
        for split, count in counts.items():
            for index in tqdm(range(count), desc=f"twin {dataset} {split}", unit="img"):
                rng = np.random.default_rng([seed, SPLIT_SALT[split], index])
                height, width = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
                layers: list[tuple[int, np.ndarray]] | None = [] if detail is not None else None
                image, label = make_scene(height, width, train_ids, rng, max_shapes=max_shapes, layers=layers)
                raw = to_raw[label]
                key, image_name, label_name = _names(dataset, split, index)
                (staging / image_name).parent.mkdir(parents=True, exist_ok=True)
                (staging / image_name).write_bytes(_encode_jpeg(image))
                if detail is not None:
                    assert layers is not None  # collected whenever the JSON is written
                    detail.add(key, split, label, layers)
                    continue
                (staging / label_name).parent.mkdir(parents=True, exist_ok=True)
                if dataset == "pascal_context_59":
                    (staging / label_name).write_bytes(encode_label_mat(raw))
                else:
                    (staging / label_name).write_bytes(_encode_png(raw.astype(np.uint8)))
            if dataset == "pascal_context_59" and detail is None:
                split_list = staging / VOC_FOLDER / "ImageSets/SegmentationContext" / f"{split}.txt"
                split_list.parent.mkdir(parents=True, exist_ok=True)
                split_list.write_text("".join(f"{_names(dataset, split, i)[0]}\n" for i in range(count)))
        if detail is not None:
            (staging / VOC_FOLDER / DETAIL_JSON).write_bytes(detail.to_bytes())
    log.info("wrote a %s twin (%s) to %s", info.title, counts, out)
    return TwinReport(root=out, dataset=dataset, counts=counts, train_ids=train_ids)
