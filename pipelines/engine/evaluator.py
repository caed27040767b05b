"""Single- and multi-scale evaluation exactly as the published numbers were measured (docs/reference.md §R2.5).

For every image: each test view of the config's pipeline (scales x flips) goes through sliding-window
(or whole-image) inference; the averaged map is resized once to the original size and softmaxed
(flipped views flipped back; the Mask2Former padded views cropped back first); the probabilities of
all views are averaged; the argmax is the prediction, scored against the original-size label with
the reference's metric, accumulated over the set and summed across ranks (each image counted once:
the data room's evaluation reader gives each rank a disjoint share).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from data.eval_transforms import TestPipeline
from models.config import SegmentorConfig
from pipelines.engine.inference import slide_inference, to_probabilities, whole_inference
from pipelines.engine.metrics import SegMetrics

log = logging.getLogger(__name__)

EvalPrecision = Literal["fp32", "bf16", "fp16"]
# called with each evaluated item and its (H, W) predicted train ids, after the item is scored
OnPrediction = Callable[[dict[str, Any], np.ndarray], None]
PrecisionChoice = Literal["recipe", "fp32", "bf16", "fp16"]


def resolve_precision(
    config: SegmentorConfig, requested: PrecisionChoice, device: torch.device
) -> EvalPrecision:
    """``recipe``: how the reference's test.py ran this config (docs/reference.md §R2.6): fp16 autocast on CUDA for
    the five configs whose ``fp16`` key switches it on (DeiT-T/S/B, AugReg-T/B), fp32 otherwise and on CPU."""
    if requested != "recipe":
        return requested
    return "fp16" if config.data.eval.fp16 and device.type == "cuda" else "fp32"


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


def evaluate(
    model: nn.Module,
    items: Iterable[dict[str, Any]],
    pipeline: TestPipeline,
    settings: InferenceSettings,
    *,
    num_classes: int,
    device: torch.device,
    class_names: tuple[str, ...] | None = None,
    total: int | None = None,
    progress: bool = True,
    distributed: bool = False,
    on_prediction: OnPrediction | None = None,
) -> dict[str, Any]:
    """Metrics over ``items`` (``{"image": (H, W, 3) uint8 BGR, "label": (H, W) train ids, ...}``).

    ``on_prediction(item, pred)`` (optional) sees every item of this rank with its (H, W) predicted train ids
    after it is scored (e.g. to draw it).

    Returns:
        ``aAcc``, ``mIoU``, ``mAcc`` in percent, ``num_images`` and ``per_class`` (see :class:`SegMetrics`).
    """
    from pipelines.engine.labels import predict_labels  # it builds on this module

    model.eval()
    metrics = SegMetrics(num_classes=num_classes, class_names=class_names)
    for item in tqdm(items, total=total, disable=not progress, desc="evaluate", dynamic_ncols=True):
        pred = predict_labels(
            model,
            item["image"],
            pipeline,
            settings,
            num_classes=num_classes,
            device=device,
            source=str(item.get("key", "an image")),
        )
        metrics.update(pred, np.asarray(item["label"]))
        if on_prediction is not None:
            on_prediction(item, pred)
    if distributed:
        metrics.all_reduce()
    return metrics.compute()
