"""The reference training pipeline as a small frozen spec plus one function.

Follows the "Train pipeline" bullets of every config in ``docs/reference.md`` §R3 (mmsegmentation
0.20.2 + the ViT-Adapter ``ToMask``), after ``LoadImageFromFile`` / ``LoadAnnotations`` (the loaders decode
the shards; labels arrive as train ids, ``reduce_zero_label`` having been applied when the shards were made):

1. ``Resize`` with ``ratio_range``: ``r ~ U(0.5, 2.0)``, target ``(int(scale[0] r), int(scale[1] r))``, keep
   ratio (:func:`data.ops.imrescale`), bilinear image, nearest label.
2. ``RandomCrop`` to ``crop_size`` with ``cat_max_ratio`` 0.75 (:func:`data.ops.random_crop_box`).
3. ``RandomFlip`` horizontal with probability 0.5.
4. ``PhotoMetricDistortion`` (:class:`data.ops.PhotoMetricDistortion`).
5. ``Normalize`` with the config's mean/std, BGR to RGB.
6. ``Pad`` bottom/right to ``crop_size``: image with 0 (after normalisation), label with 255.
7. ``ToMask`` (Mask2Former configs): the labels present (255 excluded) and one binary mask each.

The config-specific numbers live in :class:`TrainPipeline`; ``pipelines`` maps the zoo's recipes onto it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from data.catalog import IGNORE_INDEX
from data.ops import (
    PhotoMetricDistortion,
    hflip,
    imnormalize,
    impad,
    imrescale,
    random_crop_box,
    random_scale,
)

IMAGENET_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
IMAGENET_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)
HALF_MEAN: tuple[float, float, float] = (127.5, 127.5, 127.5)
HALF_STD: tuple[float, float, float] = (127.5, 127.5, 127.5)


@dataclass(frozen=True)
class TrainPipeline:
    """Parameters of the reference training pipeline.

    Attributes:
        scale: mmseg ``img_scale`` before the random ratio, e.g. ``(2048, 512)`` (ADE20K 512 crop),
            ``(2048, 640)``, ``(3584, 896)``, ``(520, 520)`` (Pascal Context).
        crop_size: ``(height, width)`` of the random crop and of the padded output.
        ratio_range: range of the random rescale ratio.
        cat_max_ratio: largest share of one class in an accepted crop (1.0 disables the check).
        flip_prob: probability of a horizontal flip.
        photometric: the photometric distortion, or ``None`` to skip it.
        mean: normalisation mean (RGB order, as in the configs).
        std: normalisation std.
        to_rgb: convert BGR to RGB before normalising.
        pad_value: image padding value (in normalised space).
        seg_pad_value: label padding value.
        to_mask: also produce Mask2Former targets (``gt_labels``, ``gt_masks``).
        ignore_index: ignored label value.
    """

    scale: tuple[int, int]
    crop_size: tuple[int, int]
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: PhotoMetricDistortion | None = field(default_factory=PhotoMetricDistortion)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    to_rgb: bool = True
    pad_value: float = 0.0
    seg_pad_value: int = IGNORE_INDEX
    to_mask: bool = False
    ignore_index: int = IGNORE_INDEX

    def __post_init__(self) -> None:
        if len(self.scale) != 2 or min(self.scale) <= 0:
            raise ValueError(f"scale must be two positive sides, got {self.scale}")
        if len(self.crop_size) != 2 or min(self.crop_size) <= 0:
            raise ValueError(f"crop_size must be (height, width) > 0, got {self.crop_size}")
        if not 0 < self.ratio_range[0] <= self.ratio_range[1]:
            raise ValueError(f"ratio_range must satisfy 0 < low <= high, got {self.ratio_range}")
        if not 0 < self.cat_max_ratio <= 1:
            raise ValueError(f"cat_max_ratio must be in (0, 1], got {self.cat_max_ratio}")
        if not 0 <= self.flip_prob <= 1:
            raise ValueError(f"flip_prob must be in [0, 1], got {self.flip_prob}")

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
        """Apply the pipeline to one sample.

        Args:
            image: ``(H, W, 3)`` uint8 BGR, as decoded.
            label: ``(H, W)`` uint8 train ids (255 ignored).
            rng: random generator; the same generator state gives the same output.

        Returns:
            ``image``: ``(3, crop_h, crop_w)`` float32 normalised; ``label``: ``(crop_h, crop_w)`` uint8; and,
            with ``to_mask``, ``gt_labels``: ``(N,)`` int64 and ``gt_masks``: ``(N, crop_h, crop_w)`` bool.
        """
        if image.shape[:2] != label.shape:
            raise ValueError(f"image {image.shape[:2]} and label {label.shape} sizes differ")
        scale = random_scale(self.scale, self.ratio_range, rng)
        image = imrescale(image, scale, "bilinear")
        label = imrescale(label, scale, "nearest")

        y1, y2, x1, x2 = random_crop_box(
            label, self.crop_size, rng, cat_max_ratio=self.cat_max_ratio, ignore_index=self.ignore_index
        )
        image, label = image[y1:y2, x1:x2], label[y1:y2, x1:x2]

        if rng.random() < self.flip_prob:
            image, label = hflip(image), hflip(label)
        if self.photometric is not None:
            image = self.photometric(image, rng)

        normalised = imnormalize(image, self.mean, self.std, to_rgb=self.to_rgb)
        normalised = impad(normalised, self.crop_size[0], self.crop_size[1], self.pad_value)
        label = impad(np.ascontiguousarray(label), self.crop_size[0], self.crop_size[1], self.seg_pad_value)
        result: dict[str, Any] = {
            "image": np.ascontiguousarray(normalised.transpose(2, 0, 1)),  # (H, W, 3) -> (3, H, W)
            "label": label,
        }
        if self.to_mask:
            result.update(to_mask(label, ignore_index=self.ignore_index))
        return result


def to_mask(label: np.ndarray, *, ignore_index: int = IGNORE_INDEX) -> dict[str, np.ndarray]:
    """ViT-Adapter's ``ToMask``: the classes present in ``label`` and a binary mask for each.

    Args:
        label: ``(H, W)`` uint8 train ids.
        ignore_index: value left out.

    Returns:
        ``gt_labels``: ``(N,)`` int64 sorted class ids; ``gt_masks``: ``(N, H, W)`` bool (the reference stores
        int64 0/1; bool holds the same values in an eighth of the memory).
    """
    classes = np.unique(label)
    classes = classes[classes != ignore_index]
    masks = label[None, :, :] == classes[:, None, None]  # (N, H, W)
    return {"gt_labels": classes.astype(np.int64), "gt_masks": masks}
