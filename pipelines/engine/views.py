"""One image's test views through the network: the inference settings, each view's scores, their average.

The reference protocol (docs/reference.md §R2.5): every view of the config's test pipeline (scales x flips)
goes through sliding-window (or whole-image) inference; each view's scores are resized once to the original
size and softmaxed (flipped views flipped back, the Mask2Former padded views cropped back first), and the
probabilities of all views are averaged. :func:`pipelines.engine.labels.predict_labels` turns them into the
label map (with memory linear in the pixels), :func:`pipelines.engine.evaluator.evaluate` scores a whole set.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from data.eval_transforms import TestPipeline
from models.config import SegmentorConfig
from pipelines.engine.inference import slide_inference, to_probabilities, whole_inference

EvalPrecision = Literal["fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class InferenceSettings:
    """How to run inference.

    Attributes:
        mode: ``slide`` (the reference) or ``whole``.
        crop, stride: slide windows.
        batch_windows: windows per forward.
        precision: ``fp32`` (the goldens), or autocast to ``bf16``/``fp16`` (the reference ran the
            DeiT/AugReg-T/B configs under fp16 autocast, docs/reference.md §R2.6).
    """

    mode: Literal["slide", "whole"]
    crop: tuple[int, int]
    stride: tuple[int, int]
    batch_windows: int = 4
    precision: EvalPrecision = "fp32"

    @classmethod
    def from_config(cls, config: SegmentorConfig, **overrides: Any) -> InferenceSettings:
        eval_recipe = config.data.eval
        values = {"mode": eval_recipe.mode, "crop": eval_recipe.crop_size, "stride": eval_recipe.stride}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _autocast(device: torch.device, precision: EvalPrecision) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


@torch.no_grad()
def iter_view_scores(
    model: nn.Module,
    image: np.ndarray,
    pipeline: TestPipeline,
    settings: InferenceSettings,
    *,
    num_classes: int,
    device: torch.device,
) -> Iterator[tuple[torch.Tensor, bool, tuple[int, int] | None]]:
    """Each test view's averaged scores before the resize to the original size.

    Yields:
        ``(scores (1, K, h, w), flipped, valid_size or None)`` per view of the pipeline; the scores in the
        dtype the reference keeps them in (float16 under fp16 autocast, docs/reference.md §R2.7), to be
        resized in it and softmaxed in float32 (:func:`pipelines.engine.inference.to_probabilities`).
    """
    for view in pipeline.iter_views(image):
        img = torch.from_numpy(view.image)[None].to(device)
        padded = tuple(view.image.shape[1:]) != view.img_shape
        with _autocast(device, settings.precision):
            if settings.mode == "slide":
                scores = slide_inference(
                    model,
                    img,
                    num_classes=num_classes,
                    crop=settings.crop,
                    stride=settings.stride,
                    batch_windows=settings.batch_windows,
                )
            else:
                scores = whole_inference(model, img)
        yield scores, view.flip, view.img_shape if padded else None


@torch.no_grad()
def predict_probabilities(
    model: nn.Module,
    image: np.ndarray,
    pipeline: TestPipeline,
    settings: InferenceSettings,
    *,
    num_classes: int,
    device: torch.device,
) -> torch.Tensor:
    """Class probabilities of one image averaged over the pipeline's views.

    Args:
        model: segmentor in eval mode whose ``forward`` gives (N, K, h/4, w/4) logits or scores.
        image: (H, W, 3) uint8 BGR as read.
        pipeline: the test transform (single- or multi-scale).
        settings: inference settings.
        num_classes: K.
        device: where the model runs.

    Returns:
        (K, H, W) float32 probabilities on the CPU (K x H x W x 4 bytes: for large photos use
        :func:`pipelines.engine.labels.predict_labels`, which never holds them).
    """
    original = (int(image.shape[0]), int(image.shape[1]))
    total: torch.Tensor | None = None
    views = 0
    for scores, flipped, valid_size in iter_view_scores(
        model, image, pipeline, settings, num_classes=num_classes, device=device
    ):
        probs = to_probabilities(scores, original, flipped=flipped, valid_size=valid_size)
        total = probs if total is None else total + probs
        views += 1
    if total is None:
        raise ValueError("the test pipeline produced no view")
    return (total / views)[0].cpu()
