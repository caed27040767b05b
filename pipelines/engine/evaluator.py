"""Single- and multi-scale evaluation exactly as the published numbers were measured (docs/reference.md §R2.5).

For every image: each test view of the config's pipeline (scales x flips) goes through sliding-window
(or whole-image) inference; the averaged map is resized once to the original size and softmaxed
(flipped views flipped back; the Mask2Former padded views cropped back first); the probabilities of
all views are averaged (:mod:`pipelines.engine.views`); the argmax (:mod:`pipelines.engine.labels`) is the
prediction, scored against the original-size label with the reference's metric, accumulated over the set and
summed across ranks (each image counted once: the data room's evaluation reader gives each rank a disjoint
share).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from data.eval_transforms import TestPipeline
from models.config import SegmentorConfig
from pipelines.engine.labels import predict_labels
from pipelines.engine.metrics import SegMetrics
from pipelines.engine.views import EvalPrecision, InferenceSettings

log = logging.getLogger(__name__)

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
