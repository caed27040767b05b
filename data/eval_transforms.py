"""The reference test-time pipelines (single- and multi-scale, with flip) as a frozen spec.

Follows docs/reference.md §P7 and the "SS/MS test pipeline" bullets of
``docs/reference.md`` §R3 (mmsegmentation 0.20.2 ``MultiScaleFlipAug`` and the ViT-Adapter ``SETR_Resize`` /
``PadShortSide``). For each scale, then for each flip (unflipped first), one view is made:

* scales: ``scale`` itself when ``ratios`` is ``None``, else ``(int(scale[0] * r), int(scale[1] * r))`` per
  ratio ``r``.
* ``resize_mode="mmseg"``: keep-ratio resize with mmcv's rounding (:func:`data.ops.imrescale`), then, when
  ``size_divisor`` is set, ``ResizeToMultiple`` as a second, separate uint8 bilinear resize. Used by every
  single-scale row, the DeiT/AugReg ``--aug-test`` rows (ratios 0.5 .. 1.75) and the BEiT 896 rows (ratios
  giving short sides 640/768/896 or 800/832/864/896).
* ``resize_mode="setr"``: ``SETR_Resize``: short side ``max(min(scale), crop_size)`` (i.e. raised to the crop
  size), long side following the aspect ratio with no cap, and no ``ResizeToMultiple`` (``size_divisor`` must
  be ``None``). Used by the BEiT 640 ADE20K and Pascal Context 480 multi-scale rows.
* flip (flipped views only): horizontal flip of the resized image.
* ``pad_short_side``: ``PadShortSide``: pad bottom/right so that both sides are at least ``size``, either
  before ``Normalize`` (raw value, e.g. 0 = black) or after it (value in normalised space). The view keeps
  the pre-pad ``img_shape`` so inference can crop the padding away (``EncoderDecoderMask2FormerAug``).
* ``Normalize``: float32, BGR to RGB, ``(x - mean) / std`` as mmcv computes it.

Predictions are averaged by the caller and resized to the original image size (docs/reference.md §R2.5).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np

from data.ops import hflip, imnormalize, impad, imrescale, resize_to_multiple
from data.train_transforms import IMAGENET_MEAN, IMAGENET_STD

ResizeMode = Literal["mmseg", "setr"]
PadStage = Literal["before_normalize", "after_normalize"]


@dataclass(frozen=True)
class PadShortSide:
    """ViT-Adapter ``PadShortSide``: pad each side up to ``size`` (bottom/right) with ``value``.

    Attributes:
        size: minimum side after padding (the crop size, e.g. 896).
        stage: ``before_normalize`` (``value`` in raw pixel space: the BEiT 896 ``_ms`` configs) or
            ``after_normalize`` (``value`` in normalised space: the BEiTv2 896 ``_ms`` config).
        value: padding value.
    """

    size: int
    stage: PadStage
    value: float = 0.0


@dataclass(frozen=True)
class TestView:
    """One test-time input.

    Attributes:
        image: ``(3, h, w)`` float32 normalised network input.
        flip: whether the view is horizontally flipped (flip the prediction back).
        scale: the mmseg target scale that produced it.
        img_shape: ``(h, w)`` before ``PadShortSide`` (equal to the image size without padding).
    """

    __test__ = False  # not a pytest test class despite its name

    image: np.ndarray
    flip: bool
    scale: tuple[int, int]
    img_shape: tuple[int, int]


def setr_rescale(image: np.ndarray, scale: tuple[int, int], crop_size: int) -> np.ndarray:
    """ViT-Adapter ``SETR_Resize`` (``setr_multi_scale=True``): short side ``max(min(scale), crop_size)``.

    The target is computed in floats as the reference does, ``(new_short * h / w, new_short)`` for portrait
    images and ``(new_short, new_short * w / h)`` otherwise, then rescaled with mmcv's rounding.
    """
    new_short = crop_size if min(scale) < crop_size else min(scale)
    height, width = image.shape[:2]
    if height > width:
        target = (new_short * height / width, float(new_short))
    else:
        target = (float(new_short), new_short * width / height)
    return imrescale(image, target, "bilinear")


@dataclass(frozen=True)
class TestPipeline:
    """Parameters of a reference test pipeline (see the module docstring for the steps).

    Attributes:
        scale: mmseg ``img_scale``, e.g. ``(2048, 512)``, ``(3584, 896)``, ``(4096, 520)``.
        ratios: ``img_ratios`` of ``MultiScaleFlipAug``, or ``None`` for single scale.
        flip: add a horizontally flipped view per scale.
        resize_mode: ``mmseg`` (Resize keep_ratio) or ``setr`` (SETR_Resize).
        size_divisor: ``ResizeToMultiple`` divisor (32), or ``None`` to skip it (required for ``setr``).
        crop_size: the slide-window crop; the short-side floor of ``setr``.
        pad_short_side: ``PadShortSide`` settings, or ``None``.
        mean: normalisation mean (RGB order).
        std: normalisation std.
        to_rgb: convert BGR to RGB before normalising.
    """

    __test__ = False  # not a pytest test class despite its name

    scale: tuple[int, int]
    ratios: tuple[float, ...] | None = None
    flip: bool = False
    resize_mode: ResizeMode = "mmseg"
    size_divisor: int | None = 32
    crop_size: int | None = None
    pad_short_side: PadShortSide | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    to_rgb: bool = True

    def __post_init__(self) -> None:
        if len(self.scale) != 2 or min(self.scale) <= 0:
            raise ValueError(f"scale must be two positive sides, got {self.scale}")
        if self.ratios is not None and (not self.ratios or min(self.ratios) <= 0):
            raise ValueError(f"ratios must be positive, got {self.ratios}")
        if self.resize_mode not in ("mmseg", "setr"):
            raise ValueError(f"resize_mode must be 'mmseg' or 'setr', got {self.resize_mode!r}")
        if self.resize_mode == "setr" and (self.crop_size is None or self.size_divisor is not None):
            raise ValueError("resize_mode='setr' needs crop_size and size_divisor=None (no ResizeToMultiple)")
        if self.size_divisor is not None and self.size_divisor <= 0:
            raise ValueError(f"size_divisor must be positive or None, got {self.size_divisor}")

    @property
    def scales(self) -> list[tuple[int, int]]:
        """The target scales, one per ratio (mmseg ``MultiScaleFlipAug``)."""
        if self.ratios is None:
            return [(int(self.scale[0]), int(self.scale[1]))]
        return [(int(self.scale[0] * r), int(self.scale[1] * r)) for r in self.ratios]

    @property
    def num_views(self) -> int:
        """Forward passes per image."""
        return len(self.scales) * (2 if self.flip else 1)

    def resize(self, image: np.ndarray, scale: tuple[int, int]) -> np.ndarray:
        """The resize steps for one scale: ``(H, W, 3)`` uint8 in, ``(h, w, 3)`` uint8 out."""
        if self.resize_mode == "setr":
            assert self.crop_size is not None  # checked in __post_init__
            resized = setr_rescale(image, scale, self.crop_size)
        else:
            resized = imrescale(image, scale, "bilinear")
        if self.size_divisor is not None:
            resized = resize_to_multiple(resized, self.size_divisor)
        return resized

    def iter_views(self, image: np.ndarray) -> Iterator[TestView]:
        """Yield the views of ``image`` (``(H, W, 3)`` uint8 BGR): per scale, unflipped then flipped."""
        if image.ndim != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected a (H, W, 3) uint8 image, got shape {image.shape} {image.dtype}")
        pad = self.pad_short_side
        for scale in self.scales:
            resized = self.resize(image, scale)
            for flip in (False, True) if self.flip else (False,):
                view = hflip(resized) if flip else resized
                img_shape = (int(view.shape[0]), int(view.shape[1]))
                padded_shape = (
                    (max(img_shape[0], pad.size), max(img_shape[1], pad.size)) if pad else img_shape
                )
                if pad is not None and pad.stage == "before_normalize":
                    view = impad(view, *padded_shape, np.uint8(pad.value))
                normalised = imnormalize(view, self.mean, self.std, to_rgb=self.to_rgb)
                if pad is not None and pad.stage == "after_normalize":
                    normalised = impad(normalised, *padded_shape, pad.value)
                yield TestView(
                    image=np.ascontiguousarray(normalised.transpose(2, 0, 1)),  # (h, w, 3) -> (3, h, w)
                    flip=flip,
                    scale=scale,
                    img_shape=img_shape,
                )

    def views(self, image: np.ndarray) -> list[TestView]:
        """All views of ``image`` as a list (see :meth:`iter_views`)."""
        return list(self.iter_views(image))
