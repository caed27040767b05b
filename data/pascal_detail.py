"""PASCAL-Context 459-class label maps from the Detail API's ``trainval_merged.json``.

``trainval_merged.json`` is how the PASCAL in Detail API distributes the PASCAL-Context annotations, and what
mmsegmentation's Pascal Context converter reads (``Detail(json_path, img_dir, phase)``, ``getImgs()`` and
``getMask(img)`` for each image). The facts this module follows (the Detail API's
``PythonAPI/detail/__init__.py``, ccvl/detail-api; mmsegmentation's ``tools/convert_datasets/pascal_context.py``):

* The file is one JSON object. ``images`` holds one entry per image: ``image_id`` (an int, ``2008_000002``
  becomes ``2008000002``), ``file_name`` (``2008_000002.jpg`` in ``JPEGImages``), ``height``, ``width`` and
  ``phase`` (``train`` or ``val``: the image sets). ``annos_segmentation`` holds the region annotations:
  ``id``, ``image_id``, ``category_id`` and ``segmentation``, a COCO run-length encoding
  ``{"size": [height, width], "counts": "<compressed string>"}`` (plus ``area``, ``bbox``, ``iscrowd``,
  ``parts``). ``categories`` (``category_id``, ``name``, ...), ``parts``, ``annos_occlusion`` and
  ``annos_boundary`` complete it; they play no part in the label maps.
* ``getMask(img)`` without a category starts from zeros of ``(height, width)`` and paints, for each
  annotation of the image in the order of ``annos_segmentation`` (annotations are indexed by ``id``: a
  repeated ``id`` replaces the earlier entry, keeping its place), every pixel where its decoded mask is set
  with its ``category_id``. Later annotations therefore overwrite earlier ones where they overlap, and pixels
  no annotation covers stay 0 (background). ``category_id`` is the 459-class id of the PASCAL-Context
  ``labels.txt`` (1..459); the converter then asserts every pixel's id is one of the 60 kept ids.
* The converter's split lists are the images of each ``phase`` (``Detail(..., 'train').getImgs()``),
  named by ``file_name`` without its extension.

Run-length encodings are decoded here (no pycocotools): ``counts`` alternates runs of 0 and 1, starting with
0, over the mask in column-major order; the compressed string form stores each count (from the fourth on as
the difference to the count two before) in 5-bit groups, least significant first, as characters ``48 + v``
with bit 0x20 marking that more groups follow and bit 0x10 of the last group extending the sign. Uncompressed
counts (a list) and polygons (a list of ``[x1, y1, x2, y2, ...]``; a pixel belongs to one when its centre lies
inside) are accepted too, though the Detail API itself decodes run-length encodings only.

The file is parsed once per process and file version (:func:`load_detail_annotations`; each reader process
of ``prepare --workers`` parses it once), and only what the label maps need is kept.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data.sources import SourceSpec, open_source

DETAIL_JSON = "trainval_merged.json"
# Compressed RLE strings: characters 48 + v, 5 value bits a character, 0x20 "more follows", 0x10 sign bit.
RLE_CHAR_OFFSET = 48
RLE_VALUE_BITS = 5
RLE_VALUE_MASK = 0x1F
RLE_MORE_BIT = 0x20
RLE_SIGN_BIT = 0x10
# Values are at most 32 bits wide (7 groups of 5 bits); more groups would overflow the int64 arithmetic.
MAX_RLE_GROUPS = 12
MAX_CATEGORY_ID = np.iinfo(np.uint16).max
_PARSED_CACHE = 2


class DetailFormatError(ValueError):
    """``trainval_merged.json`` (or one of its annotations) does not have the Detail API's format."""


@dataclass(frozen=True)
class DetailImage:
    """One entry of ``images``.

    Attributes:
        key: ``file_name`` without folder and extension (``2008_000002``), the sample key.
        image_id: the Detail API's integer id (``2008000002``).
        file_name: the image file in ``JPEGImages``.
        height: label map height.
        width: label map width.
        phase: image set (``train``, ``val``, ...).
    """

    key: str
    image_id: int
    file_name: str
    height: int
    width: int
    phase: str


@dataclass
class DetailAnnotations:
    """What the label maps of a ``trainval_merged.json`` need: its images and their annotations in order.

    Attributes:
        source: the file, for messages.
        images: image entries by key.
        annotations: ``(category_id, segmentation)`` per image key, in painting order.
    """

    source: str
    images: dict[str, DetailImage]
    annotations: dict[str, list[tuple[int, Any]]] = field(repr=False)

    def keys_in_phase(self, phase: str) -> list[str]:
        """Sorted keys of the images of ``phase`` (the converter's split list)."""
        return sorted(key for key, image in self.images.items() if image.phase == phase)

    def label_map(self, key: str) -> np.ndarray:
        """The 459-class label map of image ``key`` as ``getMask(img)`` builds it.

        Returns:
            ``(height, width)`` uint16 category ids, 0 where no annotation covers the pixel.

        Raises:
            DetailFormatError: naming the file and image when the image is not in the file or an annotation
                cannot be decoded.
        """
        image = self.images.get(key)
        if image is None:
            raise DetailFormatError(f"{self.source}: image {key} is not in the file's images")
        where = f"{self.source}: image {key}"
        label = np.zeros((image.height, image.width), dtype=np.uint16)
        for category_id, segmentation in self.annotations.get(key, []):
            mask = decode_segmentation(segmentation, image.height, image.width, source=where)
            label[mask] = category_id
        return label


# --------------------------------------------------------------------------------------- run-length codes
def decode_rle_string(counts: str | bytes, *, source: str = "RLE") -> list[int]:
    """Decode the compressed string form of COCO run-length counts.

    Raises:
        DetailFormatError: naming ``source`` for a character outside the alphabet, a truncated or oversized
            value, or a negative count.
    """
    try:
        data = counts if isinstance(counts, bytes) else counts.encode("ascii")
    except UnicodeEncodeError as err:
        raise DetailFormatError(f"{source}: non-ASCII character in compressed RLE counts") from err
    if not data:
        return []
    chunks = np.frombuffer(data, dtype=np.uint8).astype(np.int64) - RLE_CHAR_OFFSET
    bad = np.flatnonzero((chunks < 0) | (chunks >= 2 * RLE_MORE_BIT))
    if bad.size:
        raise DetailFormatError(f"{source}: character {chr(data[bad[0]])!r} in compressed RLE counts")
    last = (chunks & RLE_MORE_BIT) == 0  # the last 5-bit group of each value
    if not last[-1]:
        raise DetailFormatError(f"{source}: compressed RLE counts end in the middle of a value")
    ends = np.flatnonzero(last)
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    if int(lengths.max()) > MAX_RLE_GROUPS:
        raise DetailFormatError(
            f"{source}: a compressed RLE value is longer than {MAX_RLE_GROUPS} characters"
        )
    group_index = np.arange(chunks.size) - np.repeat(starts, lengths)
    values = np.add.reduceat((chunks & RLE_VALUE_MASK) << (RLE_VALUE_BITS * group_index), starts)
    negative = (chunks[ends] & RLE_SIGN_BIT) != 0
    values[negative] |= np.left_shift(-1, RLE_VALUE_BITS * lengths[negative])
    # From the fourth value on, each is stored as the difference to the value two before it.
    runs = values.copy()
    runs[1::2] = np.cumsum(values[1::2])
    runs[2::2] = np.cumsum(values[2::2])
    if runs.size and int(runs.min()) < 0:
        raise DetailFormatError(f"{source}: negative run length {int(runs.min())} in RLE counts")
    return runs.tolist()


def encode_rle_string(counts: Sequence[int]) -> str:
    """The compressed string form of COCO run-length counts (inverse of :func:`decode_rle_string`)."""
    chars: list[str] = []
    for index, count in enumerate(counts):
        value = int(count) - (int(counts[index - 2]) if index > 2 else 0)
        more = True
        while more:
            chunk = value & RLE_VALUE_MASK
            value >>= RLE_VALUE_BITS
            more = value != -1 if chunk & RLE_SIGN_BIT else value != 0
            if more:
                chunk |= RLE_MORE_BIT
            chars.append(chr(chunk + RLE_CHAR_OFFSET))
    return "".join(chars)


def rle_counts(mask: np.ndarray) -> list[int]:
    """Run lengths of a binary ``(H, W)`` mask in column-major order, starting with a (possibly empty) 0 run."""
    flat = np.asarray(mask, dtype=bool).T.ravel()
    if flat.size == 0:
        return []
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    runs = np.diff(bounds).tolist()
    return [0, *runs] if flat[0] else runs


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """A binary mask as the Detail API stores it: ``{"size": [H, W], "counts": "<compressed string>"}``."""
    height, width = mask.shape
    return {"size": [int(height), int(width)], "counts": encode_rle_string(rle_counts(mask))}


def decode_rle(rle: dict[str, Any], *, source: str = "RLE") -> np.ndarray:
    """Decode a run-length encoding (compressed string or list counts) to an ``(H, W)`` bool mask.

    Raises:
        DetailFormatError: naming ``source`` when ``size`` or ``counts`` is malformed or the runs do not
            cover exactly ``H * W`` pixels.
    """
    size, counts = rle.get("size"), rle.get("counts")
    if not (isinstance(size, list | tuple) and len(size) == 2 and all(_is_int(v) and v >= 0 for v in size)):
        raise DetailFormatError(f"{source}: RLE size must be [height, width], got {size!r}")
    height, width = int(size[0]), int(size[1])
    if isinstance(counts, str | bytes):
        runs = decode_rle_string(counts, source=source)
    elif isinstance(counts, list) and all(_is_int(v) and v >= 0 for v in counts):
        runs = [int(v) for v in counts]
    else:
        raise DetailFormatError(f"{source}: RLE counts must be a string or a list of non-negative ints")
    if sum(runs) != height * width:
        raise DetailFormatError(
            f"{source}: RLE runs cover {sum(runs)} pixels, the size {height}x{width} has {height * width}"
        )
    values = np.arange(len(runs)) % 2 == 1
    flat = np.repeat(values, runs)
    return flat.reshape(width, height).T


def _polygon_mask(points: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pixels whose centre ``(col + 0.5, row + 0.5)`` lies inside the polygon (even-odd rule)."""
    mask = np.zeros((height, width), dtype=bool)
    x_lo = max(int(np.floor(points[:, 0].min())), 0)
    x_hi = min(int(np.ceil(points[:, 0].max())), width)
    y_lo = max(int(np.floor(points[:, 1].min())), 0)
    y_hi = min(int(np.ceil(points[:, 1].max())), height)
    if x_lo >= x_hi or y_lo >= y_hi:
        return mask
    centre_y = np.arange(y_lo, y_hi, dtype=np.float64)[:, None] + 0.5
    centre_x = np.arange(x_lo, x_hi, dtype=np.float64)[None, :] + 0.5
    inside = np.zeros((y_hi - y_lo, x_hi - x_lo), dtype=bool)
    for (x0, y0), (x1, y1) in zip(points, np.roll(points, -1, axis=0), strict=True):
        if y0 == y1:
            continue  # a horizontal edge crosses no horizontal ray
        crosses = (y0 > centre_y) != (y1 > centre_y)
        x_at = x0 + (centre_y - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (centre_x < x_at)
    mask[y_lo:y_hi, x_lo:x_hi] = inside
    return mask


def polygons_to_mask(
    polygons: Sequence[Sequence[float]], height: int, width: int, *, source: str
) -> np.ndarray:
    """Fill COCO polygons (``[x1, y1, x2, y2, ...]`` each, pixel units) into an ``(H, W)`` bool mask.

    A pixel is set when its centre lies inside one of the polygons (even-odd rule; the union over polygons).
    For polygons with integer vertices along the axes this equals pycocotools' rasterisation; for others it may
    differ from it in boundary pixels.

    Raises:
        DetailFormatError: naming ``source`` for a polygon with an odd number of coordinates or fewer than
            three points.
    """
    mask = np.zeros((height, width), dtype=bool)
    for polygon in polygons:
        coords = np.asarray(polygon, dtype=np.float64)
        if coords.ndim != 1 or coords.size % 2 or coords.size < 6 or not np.isfinite(coords).all():
            raise DetailFormatError(
                f"{source}: a polygon must be [x1, y1, x2, y2, ...] with at least 3 finite points, got "
                f"{coords.size} numbers"
            )
        mask |= _polygon_mask(coords.reshape(-1, 2), height, width)
    return mask


def decode_segmentation(segmentation: Any, height: int, width: int, *, source: str) -> np.ndarray:
    """Decode an annotation's ``segmentation`` (RLE dict or polygon list) for an ``height x width`` image.

    Raises:
        DetailFormatError: naming ``source`` for an unknown form or an RLE of another size than the image.
    """
    if isinstance(segmentation, dict):
        mask = decode_rle(segmentation, source=source)
        if mask.shape != (height, width):
            raise DetailFormatError(
                f"{source}: segmentation size {list(mask.shape)} differs from the image size "
                f"[{height}, {width}]"
            )
        return mask
    if isinstance(segmentation, list):
        return polygons_to_mask(segmentation, height, width, source=source)
    raise DetailFormatError(
        f"{source}: segmentation must be an RLE dict or a list of polygons, got {type(segmentation).__name__}"
    )


# ------------------------------------------------------------------------------------------------- parsing
def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require(entry: object, keys: tuple[str, ...], what: str, source: str) -> dict[str, Any]:
    if not isinstance(entry, dict) or any(k not in entry for k in keys):
        raise DetailFormatError(
            f"{source}: every {what} entry needs the keys {', '.join(keys)}; got {entry!r:.200}"
        )
    return entry


def _parse_images(entries: list[Any], source: str) -> tuple[dict[str, DetailImage], dict[int, str]]:
    images: dict[str, DetailImage] = {}
    key_of_id: dict[int, str] = {}
    for entry in entries:
        item = _require(entry, ("image_id", "file_name", "height", "width", "phase"), "images", source)
        if not (
            _is_int(item["height"]) and _is_int(item["width"]) and item["height"] > 0 and item["width"] > 0
        ):
            raise DetailFormatError(f"{source}: image {item['file_name']!r} has a bad size")
        key = Path(str(item["file_name"])).stem
        if key in images or item["image_id"] in key_of_id:
            raise DetailFormatError(f"{source}: image {key} (id {item['image_id']}) is listed twice")
        images[key] = DetailImage(
            key=key,
            image_id=item["image_id"],
            file_name=Path(str(item["file_name"])).name,
            height=item["height"],
            width=item["width"],
            phase=str(item["phase"]),
        )
        key_of_id[item["image_id"]] = key
    return images, key_of_id


def _ordered_annotations(entries: list[Any], source: str) -> Iterator[dict[str, Any]]:
    """The annotations in the Detail API's order: indexed by ``id``, a repeated ``id`` replacing in place."""
    by_id: dict[object, dict[str, Any]] = {}
    for position, entry in enumerate(entries):
        item = _require(entry, ("image_id", "category_id", "segmentation"), "annos_segmentation", source)
        annotation_id = item.get("id", ("position", position))
        if not isinstance(annotation_id, int | str | tuple):
            raise DetailFormatError(f"{source}: annotation id {annotation_id!r} is not an int")
        by_id[annotation_id] = item
    return iter(by_id.values())


def parse_detail_json(data: bytes, *, source: str) -> DetailAnnotations:
    """Parse a ``trainval_merged.json``, keeping the images and each image's annotations in painting order.

    Raises:
        DetailFormatError: naming ``source`` when the file is not JSON or not in the Detail API's format.
    """
    try:
        content = json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise DetailFormatError(f"{source}: not a readable JSON file ({err})") from err
    if not isinstance(content, dict) or not all(
        isinstance(content.get(k), list) for k in ("images", "annos_segmentation")
    ):
        raise DetailFormatError(
            f"{source}: not a Detail API annotation file (expects an object with 'images' and "
            "'annos_segmentation' lists)"
        )
    images, key_of_id = _parse_images(content["images"], source)
    annotations: dict[str, list[tuple[int, Any]]] = {}
    for item in _ordered_annotations(content["annos_segmentation"], source):
        key = key_of_id.get(item["image_id"])
        if key is None:
            raise DetailFormatError(
                f"{source}: annotation {item.get('id')} refers to image_id {item['image_id']}, "
                "which is not in 'images'"
            )
        category_id = item["category_id"]
        if not (_is_int(category_id) and 0 <= category_id <= MAX_CATEGORY_ID):
            raise DetailFormatError(
                f"{source}: image {key}: annotation {item.get('id')} has category_id {category_id!r}"
            )
        annotations.setdefault(key, []).append((category_id, item["segmentation"]))
    return DetailAnnotations(source=source, images=images, annotations=annotations)


def _version(spec: SourceSpec, name: str) -> tuple[int, int]:
    """(size, mtime) of the file (or of its archive), so that a rewritten file is parsed again."""
    path = Path(spec.path) / spec.prefix / name if spec.kind == "dir" else Path(spec.path)
    try:
        stat = path.stat()
    except OSError:
        return (-1, -1)
    return (stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=_PARSED_CACHE)
def _load_cached(spec: SourceSpec, name: str, version: tuple[int, int], pid: int) -> DetailAnnotations:
    del version, pid  # cache keys only
    return parse_detail_json(open_source(spec).read(name), source=spec.describe(name))


def load_detail_annotations(spec: SourceSpec, name: str = DETAIL_JSON) -> DetailAnnotations:
    """Parse ``name`` in ``spec`` once per process and file version.

    Raises:
        FileNotFoundError: naming the file when it is missing.
        DetailFormatError: naming the file when it is not in the Detail API's format.
    """
    return _load_cached(spec, name, _version(spec, name), os.getpid())


def find_detail_json(candidates: Sequence[SourceSpec | None]) -> SourceSpec | None:
    """The first candidate source that holds ``trainval_merged.json`` at its top."""
    for spec in candidates:
        if spec is not None and open_source(spec).exists(DETAIL_JSON):
            return spec
    return None
