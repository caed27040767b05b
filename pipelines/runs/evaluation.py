"""The one evaluation entry point: a model, its data, a mode and a precision -> metrics, table, artifacts.

:func:`evaluate_model` is what ``vitadapter evaluate``, the DVC/Prefect evaluate stage and the evaluations
during and at the end of training call. It runs the reference protocol of :mod:`pipelines.engine.evaluator`
(sliding windows, the config's scales and flips, docs/reference.md §R2.5) in the precision the reference
measured the entry in unless told otherwise (§R2.6), compares the result with the published number of the
mode, records which deformable-attention backend ran, sets and records TF32 (on by default, as the
reference ran, :mod:`pipelines.engine.precision`), records the evaluation's recipe diff (every way it differs
from the published row, :mod:`pipelines.runs.recipe_diff`), and optionally writes colour overlays of the first
images (from the evaluation's own predictions: one pass over the images).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from torch import nn

import cuda_ops
from data.atomic import write_bytes_atomic
from data.provenance import dataset_source
from models.config import SegmentorConfig
from pipelines.config.datasets import NO_PUBLISHED_ROW, has_published_row, published_miou
from pipelines.config.specs import EvalMode, test_pipeline
from pipelines.engine.distributed import DistInfo
from pipelines.engine.evaluator import OnPrediction, PrecisionChoice, evaluate, resolve_precision
from pipelines.engine.precision import apply_tf32
from pipelines.engine.views import InferenceSettings
from pipelines.runs import recipe_diff
from pipelines.runs.inputs import EvalSource, class_names, eval_items, palette, safe_stem

log = logging.getLogger(__name__)

NUM_OVERLAYS = 2


@dataclass
class EvaluationResult:
    """What one evaluation produced.

    Attributes:
        config: zoo entry name.
        mode: ``ss`` or ``ms``.
        precision: the precision that ran.
        backend: the deformable-attention backend(s) that ran (``pytorch``, ``triton``, or both joined by ``+``).
        metrics: ``mIoU``, ``aAcc``, ``mAcc`` (percent) and ``num_images``.
        per_class: per-class IoU and Acc.
        published_miou: the published mIoU of this mode (None: none published, or a user's card).
        data: where the images came from.
        artifacts: files written (overlays).
        confusion: (K, K) int64 class confusion matrix over the set (rows the label, columns the
            prediction), accumulated beside the IoU counts (:class:`pipelines.engine.metrics.SegMetrics`).
        tf32: the TF32 setting (in effect on CUDA only).
        recipe_diff: the evaluation's :class:`pipelines.runs.recipe_diff.RecipeDiff` as a dict.
        published_row: whether the entry's published row applies (False on a user's dataset card).
        skipped: the corrupt samples left out (``skip_corrupt``; this process's), each shard, key and reason.
    """

    config: str
    mode: EvalMode
    precision: str
    backend: str
    metrics: dict[str, Any]
    per_class: Any
    published_miou: float | None
    data: str
    artifacts: list[Path] = field(default_factory=list)
    confusion: np.ndarray | None = None
    tf32: bool = True
    recipe_diff: dict[str, Any] | None = None
    published_row: bool = True
    skipped: list[dict[str, Any]] = field(default_factory=list)

    @property
    def delta_miou(self) -> float | None:
        return None if self.published_miou is None else self.metrics["mIoU"] - self.published_miou

    def summary(self) -> dict[str, Any]:
        """A flat JSON-able record (no per-class table)."""
        return {
            "config": self.config,
            "mode": self.mode,
            "precision": self.precision,
            "deform_attn_backend": self.backend,
            "data": self.data,
            "published_miou": self.published_miou,
            "delta_miou": self.delta_miou,
            # trained on a user's card: the entry's published numbers are not the same task
            **({} if self.published_row else {"published": NO_PUBLISHED_ROW}),
            "tf32": self.tf32,
            **self.metrics,
            **({"skipped": self.skipped} if self.skipped else {}),
            **(
                {
                    "comparable_to_published": bool(self.recipe_diff["comparable"]),
                    "recipe_deviations": len(self.recipe_diff["deviations"]),
                    "recipe_diff": self.recipe_diff,
                }
                if self.recipe_diff is not None
                else {}
            ),
        }


def per_class_table(
    per_class: dict[str, list], *, miou: float | None = None, macc: float | None = None
) -> str:
    """The per-class IoU and Acc (percent) as an aligned text table in class order, for a terminal.

    Args:
        per_class: ``{"name": [...], "IoU": [...], "Acc": [...]}`` (None: the class never occurs).
        miou, macc: the means, as a last row (omitted when None).

    Returns:
        Lines ``id  class  IoU  Acc`` (a class that never occurs shows ``-``), joined by newlines.
    """

    def number(value: float | None) -> str:
        return "-" if value is None or value != value else f"{value:.2f}"  # None or NaN

    names = [str(name).strip() for name in per_class["name"]]
    id_width = max(2, len(str(len(names) - 1)))
    name_width = max([5, *(len(name) for name in names)])
    rows = [f"{'id':>{id_width}}  {'class':<{name_width}}  {'IoU':>6}  {'Acc':>6}"]
    for index, (name, iou, acc) in enumerate(zip(names, per_class["IoU"], per_class["Acc"], strict=True)):
        rows.append(f"{index:>{id_width}}  {name:<{name_width}}  {number(iou):>6}  {number(acc):>6}")
    if miou is not None or macc is not None:
        rows.append(f"{'':>{id_width}}  {'mean':<{name_width}}  {number(miou):>6}  {number(macc):>6}")
    return "\n".join(rows)


def backends_label(used: dict[str, int]) -> str:
    """The backends that ran, as one label (``pytorch``, ``triton``, ``pytorch+triton``; ``none``)."""
    return "+".join(sorted(used)) or "none"


def evaluate_model(
    model: nn.Module,
    config: SegmentorConfig,
    data: str | Path | EvalSource,
    *,
    mode: EvalMode = "ss",
    precision: PrecisionChoice = "recipe",
    dist_info: DistInfo | None = None,
    inference: Literal["slide", "whole"] | None = None,
    batch_windows: int = 4,
    limit: int | None = None,
    progress: bool = False,
    overlays_dir: Path | None = None,
    tf32: bool = True,
    training_diff: dict[str, Any] | None = None,
    on_prediction: OnPrediction | None = None,
    skip_corrupt: bool = False,
) -> EvaluationResult:
    """Evaluate ``model`` (zoo entry ``config``) on the validation split of ``data``.

    Args:
        model: the segmentor (its mode is set to eval).
        config: its zoo entry (with overrides).
        data: a prepared shard folder, an official raw folder, or an :class:`EvalSource` already opened.
        mode: ``ss`` (single-scale) or ``ms`` (multi-scale + flip).
        precision: ``recipe`` (as the reference measured this entry) or a forced one.
        dist_info: process placement; None: one process on the model's device.
        inference: ``slide``/``whole`` instead of the config's.
        batch_windows: sliding windows per forward.
        limit: the first N images only.
        progress: a progress bar (rank 0).
        overlays_dir: where to write colour overlays of the first images rank 0 evaluates
            (:class:`OverlayWriter`, in the same pass), or None.
        tf32: TF32 convolutions and matmuls on CUDA (the reference's).
        training_diff: the recorded training recipe diff of the checkpoint's run (its run folder's
            ``recipe_diff.json``), folded into this evaluation's; None for a checkpoint not trained here.
        on_prediction: called with each item this rank evaluates and its (H, W) predicted train ids
            (:func:`pipelines.engine.evaluator.evaluate`; e.g. :class:`pipelines.runs.show.ComparisonWriter`).
        skip_corrupt: leave out shard samples that cannot be read (counted as ``skipped_samples``, listed in
            ``skipped``) instead of stopping with an error naming the shard and the key.

    Raises:
        ValueError: ``ms`` for an entry without a multi-scale recipe.
    """
    device = dist_info.device if dist_info is not None else next(model.parameters()).device
    rank, world = (dist_info.rank, dist_info.world_size) if dist_info is not None else (0, 1)
    pipeline = test_pipeline(config, mode)
    resolved = resolve_precision(config, precision, device)
    settings = InferenceSettings.from_config(
        config, mode=inference, batch_windows=batch_windows, precision=resolved
    )
    source = (
        data
        if isinstance(data, EvalSource)
        else eval_items(config, data, rank=rank, world_size=world, limit=limit, skip_corrupt=skip_corrupt)
    )
    apply_tf32(tf32, device)
    overlays = OverlayWriter(overlays_dir, config) if overlays_dir is not None and rank == 0 else None
    callbacks = [c for c in (overlays, on_prediction) if c is not None]
    before = cuda_ops.backend_usage()
    metrics = evaluate(
        model,
        source.items,
        pipeline,
        settings,
        num_classes=config.num_classes,
        device=device,
        class_names=class_names(config),
        total=source.total,
        progress=progress and rank == 0,
        distributed=dist_info is not None and dist_info.distributed,
        on_prediction=_each(callbacks),
    )
    used = cuda_ops.usage_since(before)
    if skip_corrupt:
        metrics["skipped_samples"] = _count_across(len(source.skipped), dist_info)
    per_class = metrics.pop("per_class")
    confusion = metrics.pop("confusion", None)
    artifacts: list[Path] = overlays.written if overlays is not None else []
    diff = recipe_diff.evaluation_diff(
        config,
        mode=mode,
        precision=resolved,
        tf32=tf32,
        inference=settings.mode,
        num_images=int(metrics.get("num_images", 0)),
        limit=limit,
        dataset=(
            {"kind": "unknown", "reason": source.description}
            if isinstance(data, EvalSource)
            else dataset_source(data)
        ),
        training=training_diff,
    )
    return EvaluationResult(
        config=config.name,
        mode=mode,
        precision=resolved,
        backend=backends_label(used),
        metrics=metrics,
        per_class=per_class,
        published_miou=published_miou(config, mode),
        published_row=has_published_row(config),
        data=source.description,
        artifacts=artifacts,
        confusion=confusion,
        tf32=tf32,
        recipe_diff=diff.to_dict(),
        skipped=list(source.skipped),
    )


def _count_across(count: int, dist_info: DistInfo | None) -> int:
    """``count`` summed over the processes of a distributed evaluation."""
    if dist_info is None or not dist_info.distributed:
        return count
    import torch

    total = torch.tensor([count], dtype=torch.int64, device=dist_info.device)
    torch.distributed.all_reduce(total)
    return int(total.item())


def _each(callbacks: list[OnPrediction]) -> OnPrediction | None:
    """One ``on_prediction`` that calls each of ``callbacks`` in turn (None for none)."""
    if len(callbacks) <= 1:
        return callbacks[0] if callbacks else None

    def call_each(item: dict[str, Any], pred: np.ndarray) -> None:
        for callback in callbacks:
            callback(item, pred)

    return call_each


class OverlayWriter:
    """``on_prediction`` of :func:`evaluate_model` that writes colour overlays (with a legend) of the first
    ``count`` images it sees, named after their keys, each file atomically: the overlays come from the
    evaluation's own predictions, in its one pass over the images.

    Args:
        out: the folder (created).
        config: the zoo entry (class names and palette).
        count: how many images.

    Attributes:
        written: the files written, in order.
    """

    def __init__(self, out: Path, config: SegmentorConfig, count: int = NUM_OVERLAYS) -> None:
        self.out = Path(out)
        self.colors = palette(config)
        self.names = class_names(config)
        self.count = count
        self.written: list[Path] = []

    def __call__(self, item: dict[str, Any], pred: np.ndarray) -> None:
        if len(self.written) >= self.count:
            return
        import cv2

        from pipelines.reporting.visualize import overlay_with_legend

        key = str(item.get("key", f"image_{len(self.written)}"))
        ok, encoded = cv2.imencode(".png", overlay_with_legend(item["image"], pred, self.colors, self.names))
        if not ok:
            raise ValueError(f"{key}: PNG encoding of the overlay failed")
        self.out.mkdir(parents=True, exist_ok=True)
        self.written.append(write_bytes_atomic(self.out / f"{safe_stem(key)}.png", encoded.tobytes()))
