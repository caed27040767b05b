"""The resolved plan of one training run: recipe defaults applied once, before the trainer.

:func:`resolve_plan` turns a zoo entry's recipe (docs/reference.md §R2.3, §R2.6) and the run's knobs
(:class:`pipelines.config.knobs.TrainParams`) into a :class:`TrainPlan`: the optimizer recipe, the
schedule with the run's iterations and intervals, and the batch plan. The trainer receives this plan,
never the zoo entry with its published numbers, so every default is decided here and only here.

The batch plan keeps the recipe's global batch (16) whatever the number of processes, and by default also
the reference's BatchNorm groups: the reference trains every BatchNorm as SyncBN over the whole global batch
(8 GPUs x 2 or 16 x 1, docs/reference.md §R1, §R2.6), so unless ``batch_size`` asks for fewer images per
process, each process takes global batch / processes images in one micro-step, without accumulation
(SyncBatchNorm, on CUDA, then normalises over all of them; one process over its own). Where accumulation is
still needed (a smaller ``batch_size``, or a global batch that the processes do not divide) the samples do
not change (the accumulation slots of one process read what the ranks of a larger run would read: the data
stream's virtual ranks), but BatchNorm normalises over each micro-batch: a warning names its group size
against the reference's, and the run's recipe diff records it (:mod:`pipelines.runs.recipe_diff`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from models.config import OptimizerRecipe, ScheduleRecipe, SegmentorConfig
from pipelines.config.knobs import NonFiniteSteps, Precision, TrainParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's images are split.

    Attributes:
        per_process: images per process and micro-step.
        accumulation: micro-steps per optimizer step.
        world_size: processes.
        recipe_global_batch: the reference's images per step (its BatchNorm group too: SyncBN over all GPUs).
        bn_spans_processes: whether BatchNorm statistics span the processes (SyncBatchNorm, CUDA only).
    """

    per_process: int
    accumulation: int
    world_size: int
    recipe_global_batch: int
    bn_spans_processes: bool = True

    @property
    def global_batch(self) -> int:
        """Images per optimizer step as planned."""
        return self.per_process * self.world_size * self.accumulation

    @property
    def bn_group_size(self) -> int:
        """Images one BatchNorm normalises over: one micro-batch of every process (SyncBN) or of one."""
        return self.per_process * (self.world_size if self.bn_spans_processes else 1)

    @property
    def recipe_bn_group_size(self) -> int:
        """The reference's BatchNorm group: SyncBN over the whole global batch."""
        return self.recipe_global_batch


@dataclass(frozen=True)
class TrainPlan:
    """Everything the trainer needs, resolved.

    Attributes:
        entry: zoo entry name (recorded in checkpoints; a resumed run must match it).
        work_dir: run folder.
        optimizer: AdamW recipe with its parameter groups' rules.
        schedule: the poly schedule, with this run's ``max_iters`` and intervals.
        batch: the batch plan.
        precision, seed, deterministic, keep_checkpoints: the run's knobs.
        nonfinite_steps, max_consecutive_skips, debug_nan_at: what a non-finite step does
            (:mod:`pipelines.engine.step_guard`).
        tf32: TF32 products on CUDA (the reference's; :mod:`pipelines.engine.precision`).
        sync_bn: BatchNorm as SyncBatchNorm in multi-GPU runs (the reference's).
        progress: a progress bar on rank 0.
    """

    entry: str
    work_dir: Path
    optimizer: OptimizerRecipe
    schedule: ScheduleRecipe
    batch: BatchPlan
    precision: Precision = "fp32"
    tf32: bool = True
    seed: int = 0
    deterministic: bool = False
    keep_checkpoints: int = 1
    nonfinite_steps: NonFiniteSteps = "stop"
    max_consecutive_skips: int = 300
    debug_nan_at: int | None = None
    sync_bn: bool = True
    progress: bool = True

    @property
    def max_iters(self) -> int:
        return self.schedule.max_iters


def plan_batch(
    config: SegmentorConfig, knobs: TrainParams, world_size: int, *, bn_spans_processes: bool = True
) -> BatchPlan:
    """The batch plan of ``world_size`` processes.

    Without ``knobs.batch_size`` every process takes ceil(global batch / processes) images in one micro-step
    (no accumulation: the reference's BatchNorm groups); with it, the rest of the global batch is gradient
    accumulation. Warns loudly when the effective global batch differs from the requested one, and when
    BatchNorm's group differs from the reference's.

    Args:
        config: the zoo entry (its recipe's global batch).
        knobs: the run's knobs (``batch_size``, ``global_batch``).
        world_size: processes.
        bn_spans_processes: whether BatchNorm statistics span the processes (SyncBatchNorm on CUDA).
    """
    wanted = knobs.global_batch or config.data.train.global_batch
    if knobs.batch_size is None:
        per_process, accumulation = math.ceil(wanted / world_size), 1
    else:
        per_process = knobs.batch_size
        accumulation = max(1, math.ceil(wanted / (per_process * world_size)))
    plan = BatchPlan(
        per_process, accumulation, world_size, config.data.train.global_batch, bn_spans_processes
    )
    if plan.bn_group_size != plan.recipe_bn_group_size:
        spans = (
            "1 process"
            if world_size == 1
            else f"{world_size} processes (SyncBN)"
            if bn_spans_processes
            else "1 process (no SyncBN across processes here)"
        )
        log.warning(
            "!!! BatchNorm normalises over %d images (%d per process x %s, %d accumulation step(s)); the "
            "reference's SyncBN normalises over %d (its global batch): results are not comparable with the "
            "reference; leave --batch-size unset to keep its groups",
            plan.bn_group_size,
            per_process,
            spans,
            accumulation,
            plan.recipe_bn_group_size,
        )
    if plan.global_batch != wanted:
        log.warning(
            "!!! effective batch %d (%d per process x %d processes x %d accumulation) differs from the "
            "requested global batch %d: results are not comparable with the reference",
            plan.global_batch,
            per_process,
            world_size,
            accumulation,
            wanted,
        )
    return plan


def resolve_plan(
    config: SegmentorConfig,
    knobs: TrainParams,
    *,
    world_size: int,
    work_dir: Path,
    progress: bool = True,
    bn_spans_processes: bool = True,
) -> TrainPlan:
    """The plan of training ``config`` with ``knobs`` on ``world_size`` processes into ``work_dir``
    (``bn_spans_processes``: SyncBatchNorm is available, i.e. CUDA; see :func:`plan_batch`)."""
    recipe = config.schedule
    schedule = dataclasses.replace(
        recipe,
        max_iters=knobs.max_iters or recipe.max_iters,
        eval_interval=knobs.eval_interval or recipe.eval_interval,
        checkpoint_interval=knobs.checkpoint_interval or recipe.checkpoint_interval,
        log_interval=knobs.log_interval or recipe.log_interval,
    )
    return TrainPlan(
        entry=config.name,
        work_dir=Path(work_dir),
        optimizer=config.optimizer,
        schedule=schedule,
        batch=plan_batch(config, knobs, world_size, bn_spans_processes=bn_spans_processes),
        precision=knobs.precision,
        tf32=knobs.tf32,
        seed=knobs.seed,
        deterministic=knobs.deterministic,
        keep_checkpoints=knobs.keep_checkpoints,
        nonfinite_steps=knobs.nonfinite_steps,
        max_consecutive_skips=knobs.max_consecutive_skips,
        debug_nan_at=knobs.debug_nan_at,
        progress=progress,
    )
