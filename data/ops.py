"""Image operations of the reference data pipelines, reproduced exactly (numpy / OpenCV on HWC arrays).

Follows mmcv 1.4.2 and mmsegmentation 0.20.2 as summarised in ``docs/reference.md`` §R3 (the "Train
pipeline" and "SS/MS test pipeline" bullets of each config) and ``docs/reference.md §P7:

* :func:`rescale_size` / :func:`imrescale`: mmcv's keep-ratio rescale, scale factor
  ``min(max(scale) / max(h, w), min(scale) / min(h, w))``, new size ``int(x * sf + 0.5)`` (halves round up),
  then one ``cv2.resize`` (bilinear for images, nearest for labels).
* :func:`resize_to_multiple`: mmseg's ``ResizeToMultiple``, a second, separate ``cv2.resize`` to
  ``ceil(side / divisor) * divisor`` (a stretch, not a pad).
* :func:`impad`: mmcv's ``impad`` to a shape, bottom/right.
* :func:`imnormalize`: mmcv's ``imnormalize`` in float32 (BGR to RGB, subtract mean, multiply by 1/std with
  OpenCV's arithmetic, as mmcv does).
* :func:`random_crop_box`: mmseg's ``RandomCrop`` with ``cat_max_ratio``.
* :class:`PhotoMetricDistortion`: mmseg's distortion, exact on uint8 through 256-entry lookup tables (the
  reference computes ``uint8(clip(float32(x) * alpha + beta, 0, 255))`` per pixel; a table of that function of
  the pixel value gives the same bytes, much faster).

Random draws use a ``numpy.random.Generator`` passed by the caller (the reference uses numpy's global state);
the distributions are the reference's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

Interpolation = Literal["bilinear", "nearest"]
_CV2_INTERPOLATION = {"bilinear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST}
# RandomCrop re-draws at most this many times before accepting an unchecked crop.
CROP_MAX_TRIES = 10
UINT8_LEVELS = 256
HUE_PERIOD = 180  # OpenCV's uint8 hue range


def rescale_size(height: int, width: int, scale: tuple[float, float]) -> tuple[int, int]:
    """mmcv ``rescale_size`` for a tuple scale (keep ratio): the new ``(height, width)``.

    Args:
        height: current height.
        width: current width.
        scale: ``(long, short)`` bounds in either order; the longer side is bounded by ``max(scale)`` and the
            shorter by ``min(scale)``.
    """
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * float(factor) + 0.5), int(width * float(factor) + 0.5)


def imresize(
    image: np.ndarray, height: int, width: int, interpolation: Interpolation = "bilinear"
) -> np.ndarray:
    """``cv2.resize`` to ``(height, width)``; ``(H, W)`` or ``(H, W, C)`` in, same dtype out."""
    return cv2.resize(image, (width, height), interpolation=_CV2_INTERPOLATION[interpolation])


def imrescale(
    image: np.ndarray, scale: tuple[float, float], interpolation: Interpolation = "bilinear"
) -> np.ndarray:
    """mmcv ``imrescale``: keep-ratio resize into ``scale`` (see :func:`rescale_size`)."""
    height, width = rescale_size(image.shape[0], image.shape[1], scale)
    return imresize(image, height, width, interpolation)


def resize_to_multiple(image: np.ndarray, divisor: int) -> np.ndarray:
    """mmseg ``ResizeToMultiple``: bilinear resize of each side up to a multiple of ``divisor``."""
    height = math.ceil(image.shape[0] / divisor) * divisor
    width = math.ceil(image.shape[1] / divisor) * divisor
    return imresize(image, height, width, "bilinear")


def hflip(image: np.ndarray) -> np.ndarray:
    """Horizontal flip (mmcv ``imflip``), contiguous copy."""
    return np.ascontiguousarray(image[:, ::-1])


def impad(image: np.ndarray, height: int, width: int, value: float) -> np.ndarray:
    """mmcv ``impad`` to ``(height, width)``: pad bottom and right with ``value``.

    Raises:
        ValueError: when the image is larger than the target shape.
    """
    if image.shape[0] > height or image.shape[1] > width:
        raise ValueError(f"cannot pad an image of shape {image.shape[:2]} to ({height}, {width})")
    if image.shape[0] == height and image.shape[1] == width:
        return image
    padded = np.full((height, width, *image.shape[2:]), value, dtype=image.dtype)
    padded[: image.shape[0], : image.shape[1]] = image
    return padded


def imnormalize(
    image: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...], *, to_rgb: bool = True
) -> np.ndarray:
    """mmcv ``imnormalize``: ``(H, W, 3)`` uint8 BGR to float32 ``(x - mean) / std`` (RGB when ``to_rgb``).

    As mmcv's ``Normalize`` transform, ``mean`` and ``std`` are first rounded to float32 (it stores them as
    ``np.array(..., dtype=np.float32)``), then widened to float64 for OpenCV's arithmetic, 1/std included
    (docs/reference.md §R2.7).
    """
    result = image.astype(np.float32)
    mean_row = np.float64(np.asarray(mean, dtype=np.float32).reshape(1, -1))
    std_inverse = 1 / np.float64(np.asarray(std, dtype=np.float32).reshape(1, -1))
    if to_rgb:
        cv2.cvtColor(result, cv2.COLOR_BGR2RGB, result)
    cv2.subtract(result, mean_row, result)
    cv2.multiply(result, std_inverse, result)
    return result


def random_scale(
    scale: tuple[int, int], ratio_range: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int]:
    """mmseg ``Resize.random_sample_ratio``: ``r ~ U(ratio_range)``, ``(int(scale[0] * r), int(scale[1] * r))``."""
    low, high = ratio_range
    ratio = rng.random() * (high - low) + low
    return int(scale[0] * ratio), int(scale[1] * ratio)


def random_crop_box(
    label: np.ndarray,
    crop_size: tuple[int, int],
    rng: np.random.Generator,
    *,
    cat_max_ratio: float = 1.0,
    ignore_index: int = 255,
) -> tuple[int, int, int, int]:
    """mmseg ``RandomCrop`` box ``(y1, y2, x1, x2)`` (``y2``/``x2`` may exceed the image: slicing clips).

    A box is drawn uniformly; when ``cat_max_ratio < 1`` it is checked up to 10 times: accepted when the crop
    holds more than one non-ignored class and the most frequent one covers less than ``cat_max_ratio`` of the
    non-ignored pixels, otherwise a new box is drawn. After 10 failed checks the last box drawn is used as is.

    Args:
        label: ``(H, W)`` uint8 train ids (the map the check looks at).
        crop_size: ``(height, width)`` of the crop.
        rng: random generator.
        cat_max_ratio: largest allowed share of one class.
        ignore_index: label value left out of the check.
    """
    margin_h = max(label.shape[0] - crop_size[0], 0)
    margin_w = max(label.shape[1] - crop_size[1], 0)

    def draw() -> tuple[int, int, int, int]:
        y1 = int(rng.integers(0, margin_h + 1))
        x1 = int(rng.integers(0, margin_w + 1))
        return y1, y1 + crop_size[0], x1, x1 + crop_size[1]

    box = draw()
    if cat_max_ratio < 1.0:
        for _ in range(CROP_MAX_TRIES):
            y1, y2, x1, x2 = box
            counts = np.bincount(label[y1:y2, x1:x2].ravel(), minlength=UINT8_LEVELS)
            counts[ignore_index] = 0
            present = counts[counts > 0]
            if len(present) > 1 and present.max() / present.sum() < cat_max_ratio:
                break
            box = draw()
    return box


def _convert_table(alpha: float, beta: float) -> np.ndarray:
    """``uint8(clip(float32(v) * alpha + beta, 0, 255))`` for every uint8 value ``v`` (mmseg ``convert``)."""
    values = np.arange(UINT8_LEVELS, dtype=np.float32) * float(alpha) + float(beta)
    return np.clip(values, 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class PhotoMetricDistortion:
    """mmseg ``PhotoMetricDistortion`` (0.x), applied to a ``(H, W, 3)`` uint8 BGR image.

    In order: brightness (add ``U(-delta, delta)``); a coin decides whether contrast (multiply by
    ``U(contrast_range)``) comes now or last; saturation (HSV round trip, S multiplied by
    ``U(saturation_range)``); hue (another HSV round trip, H shifted by an integer in ``[-hue_delta, hue_delta)``
    modulo 180); contrast if it was not applied first. Each of the four is applied with probability 0.5.
    Every step converts through float32 with clipping and truncation to uint8, as the reference does.
    """

    brightness_delta: int = 32
    contrast_range: tuple[float, float] = (0.5, 1.5)
    saturation_range: tuple[float, float] = (0.5, 1.5)
    hue_delta: int = 18

    def _brightness(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.integers(2):
            beta = rng.uniform(-self.brightness_delta, self.brightness_delta)
            return cv2.LUT(image, _convert_table(1.0, beta))
        return image

    def _contrast(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.integers(2):
            alpha = rng.uniform(*self.contrast_range)
            return cv2.LUT(image, _convert_table(alpha, 0.0))
        return image

    def _saturation(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.integers(2):
            alpha = rng.uniform(*self.saturation_range)
            hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
            hsv[:, :, 1] = cv2.LUT(hsv[:, :, 1], _convert_table(alpha, 0.0))
            return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
        return image

    def _hue(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.integers(2):
            shift = int(rng.integers(-self.hue_delta, self.hue_delta))
            hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
            table = ((np.arange(UINT8_LEVELS) + shift) % HUE_PERIOD).astype(np.uint8)
            hsv[:, :, 0] = cv2.LUT(hsv[:, :, 0], table)
            return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
        return image

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Distort ``image`` (``(H, W, 3)`` uint8 BGR); returns a new uint8 array."""
        image = self._brightness(image, rng)
        contrast_first = bool(rng.integers(2))
        if contrast_first:
            image = self._contrast(image, rng)
        image = self._saturation(image, rng)
        image = self._hue(image, rng)
        if not contrast_first:
            image = self._contrast(image, rng)
        return image
