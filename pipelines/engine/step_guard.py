"""What the trainer does when a step goes wrong, or a write or a sample fails: one line naming it, nothing lost.

* **Non-finite steps.** After the backward of every step the loss terms and the gradient norm are checked
  (before the update). With fp32 or bf16 a non-finite one stops the run at once (``nonfinite_steps: stop``,
  the default), naming the iteration, the terms that were not finite and the last good checkpoint; or the step
  is dropped (``skip``: no update, counted in the log and the recipe diff). With fp16 (our option: the
  reference trained in fp32, docs/reference.md §R2.6) the dynamic loss scaler drops overflowing steps, as
  mmcv's ``Fp16OptimizerHook`` would; they are counted. A dropped
  step also puts back the BatchNorm statistics its forward made non-finite. More than
  ``max_consecutive_skips`` dropped steps in a row stop the run as diverged. mmsegmentation's runner checks
  nothing: a NaN step is applied and the run trains on with NaN weights to the end.
* **Non-finite weights** (an update that overflowed with a finite gradient) are never written: every
  checkpoint and every evaluation checks them first.
* Every such stop, a full disk (:class:`data.atomic.WriteError`) and a corrupt sample
  (:class:`data.shards.IncompleteDatasetError`) end training with a :class:`TrainingFailedError`: one line
  naming the iteration, the cause and the last good checkpoint, also written as the last record of
  ``train_log.jsonl``; the command exits 1 and the MLflow run is marked FAILED with that reason.
* ``debug_nan_at`` (a debugging knob) turns the training images of one iteration into NaN: the whole
  forward is then non-finite, as in a diverged run, for both heads (Mask2Former's matcher included).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from data.atomic import WriteError, append_line
from pipelines.runs.folder import SKIPPED_SAMPLES, TRAIN_LOG

log = logging.getLogger(__name__)

FailureKind = Literal["nonfinite", "diverged", "weights", "disk", "data"]
# terms named in a message (Mask2Former has 30 and more); the rest are counted
NAMED_TERMS = 6


class TrainingFailedError(RuntimeError):
    """Training stopped on something it must not go past; the run folder keeps its last good checkpoint.

    Attributes:
        iteration: the iteration (1-based) that failed.
        kind: ``nonfinite`` (a step), ``diverged`` (too many dropped steps in a row), ``weights`` (non-finite
            weights before a checkpoint or an evaluation), ``disk`` (a write failed) or ``data`` (a sample or
            shard cannot be read).
        last_checkpoint: the newest complete checkpoint (None: none written yet).
    """

    def __init__(self, message: str, *, iteration: int, kind: FailureKind, last_checkpoint: Path | None):
        super().__init__(message)
        self.iteration = iteration
        self.kind = kind
        self.last_checkpoint = last_checkpoint


def last_good(checkpoint: Path | None) -> str:
    """How a failure message names where a rerun starts from."""
    if checkpoint is None:
        return "no checkpoint was written yet (a rerun starts afresh)"
    return f"the last good checkpoint is {checkpoint} (rerunning the same command resumes from it)"


@dataclass
class StepHealth:
    """Counts kept across a run (and stored in its checkpoints).

    Attributes:
        skipped_steps: steps dropped (non-finite with ``nonfinite_steps: skip``, or fp16 overflow).
        consecutive_skips: steps dropped since the last applied one.
        skipped_samples: training samples skipped as corrupt (``skip_corrupt``), each replaced.
    """

    skipped_steps: int = 0
    consecutive_skips: int = 0
    skipped_samples: int = 0

    def to_state(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_state(cls, state: Mapping[str, Any] | None) -> StepHealth:
        """The counts of a checkpoint (zero for one written before they were kept)."""
        return cls(**{k: int(v) for k, v in (state or {}).items() if k in cls.__dataclass_fields__})

    def log_values(self) -> dict[str, int]:
        """The counts that are not zero, for the training log and MLflow."""
        return {
            k: v
            for k, v in (("skipped_steps", self.skipped_steps), ("skipped_samples", self.skipped_samples))
            if v
        }


def nonfinite_terms(terms: Mapping[str, float]) -> list[str]:
    """``name=value`` of every loss term that is not finite."""
    return [f"{key}={value}" for key, value in terms.items() if not math.isfinite(value)]


def describe_terms(bad: list[str]) -> str:
    """At most :data:`NAMED_TERMS` of them, the rest counted."""
    shown = ", ".join(bad[:NAMED_TERMS])
    return shown + (f" and {len(bad) - NAMED_TERMS} more" if len(bad) > NAMED_TERMS else "")


def gradient_norm(parameters: Iterable[nn.Parameter]) -> float:
    """The global L2 norm of the gradients (what ``clip_grad_norm_`` measures); 0 without gradients."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.nn.utils.get_total_norm(grads, norm_type=2.0))


def nonfinite_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """The names of the floating-point tensors holding a NaN or an infinity (one device sync in all)."""
    items = [(name, tensor) for name, tensor in named if tensor.is_floating_point()]
    if not items:
        return []
    finite = torch.stack([torch.isfinite(tensor).all() for _, tensor in items]).cpu()
    return [name for (name, _), ok in zip(items, finite.tolist(), strict=True) if not ok]


class BufferSnapshot:
    """The buffers (BatchNorm statistics and counters) before a step, to put back when the step is dropped
    after a forward that made them non-finite."""

    def __init__(self, model: nn.Module) -> None:
        self.pairs = [(b, b.detach().clone()) for b in model.buffers()]

    def restore_if_nonfinite(self) -> bool:
        """Put every buffer back if any became non-finite; whether it did."""
        if not nonfinite_tensors((str(i), b) for i, (b, _) in enumerate(self.pairs)):
            return False
        with torch.no_grad():
            for buffer, saved in self.pairs:
                buffer.copy_(saved)
        return True


class StepGuard:
    """Checks each step before the optimizer applies it, keeps the counts, writes the one-line failures.

    Args:
        plan: the run's plan (``nonfinite_steps``, ``max_consecutive_skips``, ``precision``, grad clip).
        dist: process placement (decisions are taken over all processes).
        model: the segmentor (its weights and buffers are checked).
        optimizer, scaler: what applies the step (the scaler is enabled with fp16 only).
        latest_checkpoint: ``() -> the newest complete checkpoint`` (named in failures).
        append_record: appends a record to the training log (rank 0).
    """

    def __init__(
        self,
        plan: Any,
        dist: Any,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        *,
        latest_checkpoint: Callable[[], Path | None],
        append_record: Callable[[dict[str, Any]], None],
    ) -> None:
        self.plan = plan
        self.dist = dist
        self.model = model
        self.optimizer = optimizer
        self.scaler = scaler
        self.latest_checkpoint = latest_checkpoint
        self.append_record = append_record
        self.health = StepHealth()
        # a step may be dropped (fp16 overflow, or nonfinite_steps: skip): keep what its forward changes
        self.can_skip = plan.precision == "fp16" or plan.nonfinite_steps == "skip"

    def snapshot(self) -> BufferSnapshot | None:
        """What to put back if the coming step is dropped (None when no step can be)."""
        return BufferSnapshot(self.model) if self.can_skip else None

    def after(
        self, done: int, applied: bool, terms: dict[str, float], snapshot: BufferSnapshot | None
    ) -> None:
        """Count the step's outcome (the optimizer's gradients already cleared)."""
        if applied:
            self.health.consecutive_skips = 0
        else:
            self._dropped(done, terms, snapshot)

    def update(self, done: int, terms: dict[str, float], skipped: list[dict[str, Any]]) -> bool:
        """Check the step and apply it (or not); whether the weights were updated.

        fp32/bf16: a loss term or the gradient norm that is not finite stops the run before the update
        (``stop``) or drops the step (``skip``); the decision is taken over all processes. fp16: the loss
        scaler drops a step whose gradients overflowed (its scale goes down).
        """
        norm = None
        if self.plan.optimizer.grad_clip is not None:  # mmcv's OptimizerHook grad_clip: the global L2 norm
            self.scaler.unscale_(self.optimizer)
            norm = float(
                nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=self.plan.optimizer.grad_clip)
            )
        elif not self.scaler.is_enabled():
            norm = gradient_norm(self.model.parameters())
        bad_terms = nonfinite_terms(terms)
        nonfinite = bool(bad_terms) or (norm is not None and not math.isfinite(norm))
        nonfinite, skipped = self._across_processes(nonfinite, skipped)
        self.record_skipped_samples(done, skipped)
        if self.scaler.is_enabled():
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            return self.scaler.get_scale() >= scale  # an overflow lowers the scale
        if not nonfinite:
            try:
                self.scaler.step(self.optimizer)  # a disabled scaler: the optimizer's step
            except RuntimeError as err:  # torch refuses an lr whose step size overflows float32
                if "overflow" not in str(err):
                    raise
                raise self.fail(
                    done,
                    "nonfinite",
                    f"the optimizer's update overflows ({err}): stopped; the weights in memory are spoilt",
                    "lower the learning rate before rerunning",
                ) from err
            return True
        if self.plan.nonfinite_steps == "skip":
            return False
        if bad_terms:
            cause = f"the loss is not finite ({describe_terms(bad_terms)}"
            cause += f"; gradient norm {norm})" if norm is not None and not math.isfinite(norm) else ")"
        elif norm is not None and not math.isfinite(norm):
            cause = f"the gradient norm is {norm} (the loss terms are finite)"
        else:
            cause = "a loss term or the gradient norm is not finite on another process"
        raise self.fail(
            done,
            "nonfinite",
            f"{cause}: stopped before updating the weights",
            "to skip such steps instead: --nonfinite-steps skip (params.yaml: nonfinite_steps: skip)",
        )

    def _dropped(self, done: int, terms: dict[str, float], snapshot: BufferSnapshot | None) -> None:
        """Count a dropped step, put back the statistics its forward made non-finite, stop after too many."""
        self.health.skipped_steps += 1
        self.health.consecutive_skips += 1
        restored = snapshot is not None and snapshot.restore_if_nonfinite()
        fp16 = self.scaler.is_enabled()
        why = f"fp16 overflow, loss scale now {self.scaler.get_scale():g}" if fp16 else "not finite"
        if self.dist.is_main:
            log.log(
                logging.INFO if fp16 and not nonfinite_terms(terms) else logging.WARNING,
                "iteration %d: step skipped (%s%s%s); %d skipped so far, %d in a row",
                done,
                why,
                f": {describe_terms(nonfinite_terms(terms))}" if nonfinite_terms(terms) else "",
                ", BatchNorm statistics put back" if restored else "",
                self.health.skipped_steps,
                self.health.consecutive_skips,
            )
        if self.health.consecutive_skips > self.plan.max_consecutive_skips:
            raise self.fail(
                done,
                "diverged",
                f"{self.health.consecutive_skips} steps in a row were skipped ({why}), more than "
                f"--max-consecutive-skips {self.plan.max_consecutive_skips}: the run diverged",
                "lower the learning rate (or check the data) before rerunning",
            )

    def _across_processes(
        self, nonfinite: bool, skipped: list[dict[str, Any]]
    ) -> tuple[bool, list[dict[str, Any]]]:
        """Whether any process saw a non-finite step, and the corrupt samples every process skipped."""
        if not self.dist.distributed:
            return nonfinite, skipped
        flags = torch.tensor([float(nonfinite), float(len(skipped))], device=self.dist.device)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        if flags[1] > 0:
            gathered: list[Any] = [None] * self.dist.world_size
            torch.distributed.all_gather_object(gathered, skipped)
            skipped = [record for part in gathered for record in part]
        return bool(flags[0] > 0), skipped

    def record_skipped_samples(self, done: int, skipped: list[dict[str, Any]]) -> None:
        """Count the corrupt samples the data stream skipped (``skip_corrupt``) and list them in the run folder."""
        if not skipped:
            return
        self.health.skipped_samples += len(skipped)
        if not self.dist.is_main:
            return
        for record in skipped:
            log.warning(
                "iteration %d: skipped a corrupt sample (--skip-corrupt): %s; %d skipped so far",
                done,
                record.get("message") or record,
                self.health.skipped_samples,
            )
            append_line(self.plan.work_dir / SKIPPED_SAMPLES, json.dumps({"iteration": done, **record}))

    def fail(self, done: int, kind: FailureKind, cause: str, advice: str = "") -> TrainingFailedError:
        """The one-line failure of iteration ``done``, also written as the last record of the training log."""
        last = self.latest_checkpoint()
        message = f"iteration {done}: {cause}; {last_good(last)}" + (f"; {advice}" if advice else "")
        if self.dist.is_main:
            try:
                self.append_record({"iteration": done, "failed": kind, "error": message})
            except WriteError as err:  # the disk that failed may be the log's too: the error is still raised
                log.warning("could not record the failure in %s: %s", TRAIN_LOG, err)
        return TrainingFailedError(message, iteration=done, kind=kind, last_checkpoint=last)

    def check_weights(self, done: int, what: str) -> None:
        """Refuse to write (or evaluate) weights holding a NaN or an infinity."""
        bad = nonfinite_tensors(self.model.state_dict().items())
        if bad:
            raise self.fail(
                done,
                "weights",
                f"the weights are not finite after the update ({describe_terms(bad)}): not {what} them",
                "lower the learning rate before rerunning",
            )
