"""Iteration-based trainer with the reference recipe (docs/reference.md §R2.3, §R2.6).

* It runs a resolved :class:`pipelines.engine.plan.TrainPlan` (optimizer, schedule, batch plan); recipe
  defaults are decided there, not here.
* The global batch is per-process batch x processes x gradient-accumulation steps. The accumulation
  slots of one process read what the ranks of a larger run would read (the data stream's virtual
  ranks), so the split of the global batch does not change the samples; BatchNorm layers normalise over
  each micro-batch (SyncBatchNorm: over the micro-batches of all processes), so with accumulation their
  groups are smaller than the reference's. The default plan has no accumulation (see
  :mod:`pipelines.engine.plan`).
* fp32 by default like the reference (TF32 on CUDA as the reference ran, ``plan.tf32``); bf16 autocast, or
  fp16 autocast with loss scaling, as options.
* Mask2Former's mask terms are normalised by the matched masks of the whole step (all processes and
  micro-batches), counted from the labels before the forward (:meth:`Trainer._step_normaliser`).
* DDP through ``torchrun`` (gloo on CPU, NCCL on CUDA), BatchNorm converted to SyncBatchNorm on CUDA.
* Each iteration sets every group's lr by the poly + warmup rule before the step.
* Checkpoints every N iterations (atomic, latest K kept) and on SIGTERM; rerunning resumes from the
  latest, including optimizer, scaler, RNG states and the data-stream position (the stream is a
  pure function of the micro-step, so resuming is exact).
* Evaluation every N iterations through a callback, keeping the best-mIoU checkpoint.
* A step whose loss or gradient norm is not finite stops the run before the update, or is dropped and
  counted (``plan.nonfinite_steps``; fp16: the loss scaler drops it); a full disk and a corrupt sample stop it
  too, each with one line naming the iteration, the cause and the last good checkpoint
  (:mod:`pipelines.engine.step_guard`). Corrupt samples skipped by the data stream are listed in
  ``skipped_samples.jsonl``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from data.atomic import WriteError, append_line, write_text_atomic
from data.shards import IncompleteDatasetError
from pipelines.engine.checkpoints import CheckpointManager
from pipelines.engine.distributed import DistInfo, reduce_mean
from pipelines.engine.optim import build_optimizer
from pipelines.engine.plan import TrainPlan
from pipelines.engine.precision import apply_tf32
from pipelines.engine.progress import PROGRESS_KEYS, peak_memory_mb, progress_line
from pipelines.engine.schedule import apply_lr
from pipelines.engine.step_guard import StepGuard, StepHealth
from pipelines.runs.folder import EVAL_LOG, SKIPPED_SAMPLES, TRAIN_LOG, RunFolder

log = logging.getLogger(__name__)

FP16_INIT_SCALE = 512.0  # the fp16 key of the DeiT/AugReg configs (loss_scale init_scale 512)
CHECKPOINT_FORMAT = "vitadapter-train"
RESUME_CHANGES = "resume_changes.jsonl"


class TrainingInterruptedError(RuntimeError):
    """SIGTERM or SIGINT (Ctrl-C) arrived; a checkpoint was written and the run can be resumed by rerunning it.

    Attributes:
        signum: the signal that stopped the run (the command exits with 128 + signum: 143 or 130).
    """

    def __init__(self, message: str, signum: int = signal.SIGTERM) -> None:
        super().__init__(message)
        self.signum = int(signum)


class Callback(Protocol):
    """Receives what the trainer reports (rank 0 only)."""

    def on_log(self, iteration: int, values: dict[str, float]) -> None: ...

    def on_eval(self, iteration: int, metrics: dict[str, Any]) -> None: ...

    def on_checkpoint(self, iteration: int, path: Path, best: bool) -> None: ...


@dataclass
class TrainResult:
    """What a finished (or resumed-and-finished) run reports."""

    iterations: int
    last_checkpoint: Path | None
    best_checkpoint: Path | None
    best_miou: float | None
    history: list[dict[str, float]] = field(default_factory=list)


class _LossModule(nn.Module):
    """Routes DDP's forward to the segmentor's loss, so gradient synchronisation hooks fire."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, img: torch.Tensor, labels: torch.Tensor, **kwargs: Any) -> dict[str, torch.Tensor]:
        return self.model.loss(img, labels, **kwargs)


def _rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain values (a weights-only load accepts them)."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [
            name,
            torch.from_numpy(keys.astype(np.int64)),
            int(position),
            int(has_gauss),
            float(cached),
        ],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def micro_batch_seed(seed: int, iteration: int, virtual_rank: int) -> int:
    """Seed of the random ops (dropout, drop path) of one micro-batch.

    A function of (seed, iteration, virtual rank) only, where the virtual rank of accumulation slot k
    of rank r is ``r * accumulation + k``: the same micro-batch gets the same randomness whether it
    runs on its own process or as an accumulation slot, and a resumed run repeats it exactly.
    """
    return int(
        np.random.SeedSequence([seed, iteration, virtual_rank]).generate_state(1, dtype=np.uint64)[0] >> 1
    )


class Trainer:
    """Train one segmentor with its recipe.

    Args:
        model: the segmentor (``loss(img, labels)``), on the CPU, already initialised.
        plan: the resolved plan (optimizer, schedule, batch plan, knobs).
        dist_info: process placement from :func:`pipelines.engine.distributed.init_distributed`.
        train_batches: ``(start_step, batch_size, micro_batches) -> iterator`` over steps, each item the
            ``micro_batches`` batches ``{"image": (B, 3, H, W) float, "label": (B, H, W) int64}`` of one
            step for this process (a list, or one dict when ``micro_batches`` is 1); a pure function
            of the step, so resuming is exact.
        evaluate: ``(model) -> metrics`` with at least ``mIoU``, run on every process (it all-reduces).
        callbacks: reporting hooks (called on rank 0).
        extra_state: JSON-able facts stored in every checkpoint (config name, overrides, ...).
        state_extras: ``(health) -> facts`` stored in every checkpoint after ``extra_state``, for facts that
            follow the counts of skipped steps and samples (the recipe diff).
    """

    def __init__(
        self,
        model: nn.Module,
        plan: TrainPlan,
        dist_info: DistInfo,
        train_batches: Callable[[int, int, int], Iterator[Any]],
        *,
        evaluate: Callable[[nn.Module], dict[str, Any]] | None = None,
        callbacks: list[Callback] | None = None,
        extra_state: dict[str, Any] | None = None,
        state_extras: Callable[[StepHealth], dict[str, Any]] | None = None,
    ) -> None:
        self.plan = plan
        self.dist = dist_info
        self.train_batches = train_batches
        self.evaluate_fn = evaluate
        self.callbacks = callbacks or []
        self.extra_state = extra_state or {}
        self.state_extras = state_extras
        schedule = plan.schedule
        self.max_iters = schedule.max_iters
        self.eval_interval = schedule.eval_interval
        self.checkpoint_interval = schedule.checkpoint_interval
        self.log_interval = schedule.log_interval
        self.batch_size, self.accumulation = plan.batch.per_process, plan.batch.accumulation
        self.effective_batch = plan.batch.global_batch
        self.checkpoints = CheckpointManager(plan.work_dir, keep=plan.keep_checkpoints)

        if dist_info.distributed and dist_info.device.type == "cuda" and plan.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model.to(dist_info.device)
        self.optimizer = build_optimizer(self.model, plan.optimizer)
        self.scaler = torch.amp.GradScaler(
            dist_info.device.type, enabled=plan.precision == "fp16", init_scale=FP16_INIT_SCALE
        )
        loss_module = _LossModule(self.model)
        if dist_info.distributed:
            device_ids = [dist_info.device.index] if dist_info.device.type == "cuda" else None
            loss_module = DistributedDataParallel(loss_module, device_ids=device_ids)
        self.loss_module = loss_module
        self.guard = StepGuard(
            plan,
            dist_info,
            self.model,
            self.optimizer,
            self.scaler,
            latest_checkpoint=self.checkpoints.latest,
            append_record=self._append_log,
        )
        self._stop_requested = False
        self._stop_signal = int(signal.SIGTERM)

    # -- state -------------------------------------------------------------------------------
    def state_dict(self, iteration: int, best: float | None) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.plan.entry,
            "iteration": iteration,
            "state_dict": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": _rng_state(),
            "data": {"step": iteration, "micro_batches": self.accumulation, "seed": self.plan.seed},
            "best_miou": best,
            "plan": json.loads(json.dumps(asdict(self.plan), default=str)),
            "health": self.guard.health.to_state(),
            **self.extra_state,
            **(self.state_extras(self.guard.health) if self.state_extras is not None else {}),
        }

    def _resume(self) -> tuple[int, float | None]:
        state = self.checkpoints.load_latest()
        if state is None:
            return 0, None
        if state.get("config") != self.plan.entry:
            raise ValueError(
                f"{self.plan.work_dir} holds a run of {state.get('config')!r}, not {self.plan.entry!r}; "
                "use another work dir"
            )
        self.model.load_state_dict(state["state_dict"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        self.guard.health = StepHealth.from_state(state.get("health"))
        self._record_plan_changes(state.get("plan") or {}, int(state["iteration"]))
        # the checkpoint of iteration N is written before the evaluation at N: best.json, written with the
        # best checkpoint, knows the best score, the checkpoint's own record may be stale
        best = self.checkpoints.best_score()
        return int(state["iteration"]), best if best is not None else state.get("best_miou")

    def _record_plan_changes(self, previous: dict[str, Any], iteration: int) -> None:
        """Warn about, and record in ``resume_changes.jsonl``, every plan value that differs from the one the
        checkpoint was written with (the run goes on with the new values from ``iteration``)."""
        current = json.loads(json.dumps(asdict(self.plan), default=str))
        ignored = {"work_dir", "progress"}
        changes = {}
        for section, value in current.items():
            before = previous.get(section)
            if section in ignored or before is None or before == value:
                continue
            if isinstance(value, dict) and isinstance(before, dict):
                changes.update(
                    {f"{section}.{k}": [before.get(k), v] for k, v in value.items() if before.get(k) != v}
                )
            else:
                changes[section] = [before, value]
        if not changes or not self.dist.is_main:
            return
        log.warning(
            "resuming %s at iteration %d with a changed recipe: %s",
            self.plan.work_dir,
            iteration,
            "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()),
        )
        append_line(
            self.plan.work_dir / RESUME_CHANGES, json.dumps({"iteration": iteration, "changes": changes})
        )

    # -- signals -----------------------------------------------------------------------------
    def _on_stop_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self._stop_requested:  # a second Ctrl-C: the user wants out now, without a checkpoint
            raise KeyboardInterrupt(f"{name} again: stopping without a checkpoint")
        log.warning(
            "%s: finishing this iteration, writing a checkpoint and stopping (again: stop at once)", name
        )
        self._stop_requested = True
        self._stop_signal = signum

    # -- loop --------------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.plan.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.plan.precision == "bf16" else torch.float16
        return torch.autocast(self.dist.device.type, dtype=dtype)

    def _step(self, iteration: int, steps: Iterator[Any]) -> dict[str, float]:
        """Step ``iteration`` (0-based): the loss terms averaged over its micro-batches.

        Raises:
            TrainingFailedError: a non-finite step with ``nonfinite_steps: stop``, or more dropped steps in a
                row than ``max_consecutive_skips``.
        """
        terms: dict[str, float] = {}
        bundle = next(steps)
        micro_batches = [bundle] if isinstance(bundle, dict) else list(bundle)
        if len(micro_batches) != self.accumulation:
            raise RuntimeError(
                f"the data stream gave {len(micro_batches)} micro-batches, expected {self.accumulation}"
            )
        skipped = [record for batch in micro_batches for record in batch.get("skipped", ())]
        if self.plan.debug_nan_at == iteration + 1:
            log.warning("iteration %d: debug_nan_at: the training images of this step are NaN", iteration + 1)
            micro_batches = [{**b, "image": torch.full_like(b["image"], float("nan"))} for b in micro_batches]
        snapshot = self.guard.snapshot()
        loss_kwargs = self._step_normaliser(micro_batches)
        for k, batch in enumerate(micro_batches):
            torch.manual_seed(
                micro_batch_seed(self.plan.seed, iteration, self.dist.rank * self.accumulation + k)
            )
            img = batch["image"].to(self.dist.device, non_blocking=True)
            labels = batch["label"].to(self.dist.device, non_blocking=True)
            sync = k == self.accumulation - 1 or not isinstance(self.loss_module, DistributedDataParallel)
            context = contextlib.nullcontext() if sync else self.loss_module.no_sync()
            with context:
                with self._autocast():
                    losses = self.loss_module(img, labels, **loss_kwargs)
                self.scaler.scale(losses["loss"] / self.accumulation).backward()
            for key, value in losses.items():
                terms[key] = terms.get(key, 0.0) + float(value.detach()) / self.accumulation
        applied = self.guard.update(iteration + 1, terms, skipped)
        self.optimizer.zero_grad(set_to_none=True)
        self.guard.after(iteration + 1, applied, terms, snapshot)
        return terms

    def _step_normaliser(self, micro_batches: list[dict[str, Any]]) -> dict[str, Any]:
        """Mask2Former's mask-count normaliser of the whole step (docs/reference.md §R2.4).

        The reference divides each GPU's mask terms by the matched masks averaged over the GPUs, so the
        averaged gradient is (sum of the terms) / (masks of the global batch). The count follows from the
        labels, so it is taken over every micro-batch of every process before the forward and each
        micro-batch gets the mean per (process, micro-batch): accumulation then equals more processes.
        Models without ``count_masks`` (UperNet) get nothing.
        """
        count = getattr(self.model, "count_masks", None)
        if count is None:
            return {}
        local = sum(count(batch["label"]) for batch in micro_batches)
        total = torch.tensor(float(local), dtype=torch.float64, device=self.dist.device)
        if self.dist.distributed:
            torch.distributed.all_reduce(total)
        return {"num_masks": (total / (self.dist.world_size * self.accumulation)).float()}

    def _save(self, iteration: int, best: float | None) -> Path | None:
        self.guard.check_weights(iteration, "writing a checkpoint of")
        path = None
        if self.dist.is_main:
            path = self.checkpoints.save(self.state_dict(iteration, best), iteration)
            for callback in self.callbacks:
                callback.on_checkpoint(iteration, path, best=False)
        return path

    def fit(self) -> TrainResult:
        """Train to ``max_iters`` (resuming if the work dir holds a checkpoint)."""
        if self.plan.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        apply_tf32(self.plan.tf32, self.dist.device)
        start, best = self._resume()
        if self.dist.is_main:
            self._truncate_log(start)
        if start >= self.max_iters:
            log.info("nothing to do: the run already reached %d iterations", start)
            last = self.checkpoints.latest()
            return TrainResult(start, last, self._best_path(), best)
        previous = {sig: signal.signal(sig, self._on_stop_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        self.model.train()
        batches = self.train_batches(start, self.batch_size, self.accumulation)
        history: list[dict[str, float]] = []
        bar = tqdm(
            total=self.max_iters,
            initial=start,
            disable=not (self.plan.progress and self.dist.is_main),
            desc=self.plan.entry,
            dynamic_ncols=True,
        )
        last_path: Path | None = None
        window_start, window_iters = time.perf_counter(), 0
        run_start = window_start
        done = start
        try:
            for iteration in range(start, self.max_iters):
                done = iteration + 1
                lr = apply_lr(self.optimizer, iteration, self.plan.schedule, self.max_iters)
                terms = self._step(iteration, batches)
                window_iters += 1
                bar.update(1)
                if done % self.log_interval == 0 or done == self.max_iters:
                    elapsed = time.perf_counter() - window_start
                    values = reduce_mean(terms, self.dist.device)
                    values.update(
                        {
                            "lr": lr,
                            "time_per_iter": elapsed / window_iters,
                            "images_per_s": window_iters * self.effective_batch / max(elapsed, 1e-9),
                            "peak_memory_mb": peak_memory_mb(self.dist.device),
                            **self.guard.health.log_values(),
                        }
                    )
                    history.append({"iteration": done, **values})
                    if self.dist.is_main:
                        self._append_log({"iteration": done, **values})
                    bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}")
                    if self.dist.is_main:
                        log.info("%s", progress_line(done, self.max_iters, start, run_start, values))
                        log.debug(
                            "iter %d loss terms: %s",
                            done,
                            " ".join(f"{k}={v:.4g}" for k, v in values.items() if k not in PROGRESS_KEYS),
                        )
                        for callback in self.callbacks:
                            callback.on_log(done, values)
                    window_start, window_iters = time.perf_counter(), 0
                if done % self.checkpoint_interval == 0 or done == self.max_iters or self._stop_requested:
                    last_path = self._save(done, best) or last_path
                if self.evaluate_fn is not None and (
                    done % self.eval_interval == 0 or done == self.max_iters
                ):
                    best = self._evaluate(done, best)
                    self.model.train()
                if self._stop_requested:
                    raise TrainingInterruptedError(
                        f"stopped by {signal.Signals(self._stop_signal).name} after iteration {done}; "
                        "rerun the same command to resume",
                        self._stop_signal,
                    )
        except WriteError as err:  # a full disk: the checkpoints written before it are intact
            raise self.guard.fail(done, "disk", f"{err}; training stopped") from err
        except IncompleteDatasetError as err:  # a shard truncated or a sample corrupt since preparation
            raise self.guard.fail(
                done,
                "data",
                f"{err}; training stopped",
                "rebuild the shards (vitadapter data prepare) and rerun to resume, or pass --skip-corrupt to "
                "skip such samples",
            ) from err
        finally:
            bar.close()
            close = getattr(batches, "close", None)
            if close is not None:  # the loader's worker processes stop with the run, also a failed one
                close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return TrainResult(
            self.max_iters, last_path or self.checkpoints.latest(), self._best_path(), best, history
        )

    def _append_log(self, record: dict[str, Any]) -> None:
        # a non-finite number (the loss of a skipped step) as null: every JSON reader takes the log
        values = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        append_line(self.plan.work_dir / TRAIN_LOG, json.dumps(values))

    def _truncate_log(self, iteration: int) -> None:
        """Drop log lines written after the checkpoint a resumed run starts from (and a line torn by a kill),
        in the training log and the list of skipped samples (the resumed run reads those samples again)."""
        folder = RunFolder(self.plan.work_dir)
        for path, records in (
            (folder.train_log, folder.read_log),
            (self.plan.work_dir / SKIPPED_SAMPLES, lambda: folder.read_records(SKIPPED_SAMPLES)),
        ):
            if not path.is_file():
                continue
            kept = [record for record in records() if record["iteration"] <= iteration]
            write_text_atomic(path, "".join(json.dumps(record) + "\n" for record in kept))

    def _best_path(self) -> Path | None:
        return self.checkpoints.folder.best_checkpoint()

    def _evaluate(self, iteration: int, best: float | None) -> float | None:
        self.guard.check_weights(iteration, "evaluating")
        self.model.eval()
        with torch.no_grad():
            metrics = self.evaluate_fn(self.model)
        miou = metrics["mIoU"]
        if self.dist.is_main:
            log.info(
                "iter %d: mIoU %.2f aAcc %.2f mAcc %.2f", iteration, miou, metrics["aAcc"], metrics["mAcc"]
            )
            for callback in self.callbacks:
                callback.on_eval(iteration, metrics)
            summary = {k: metrics[k] for k in ("mIoU", "aAcc", "mAcc", "skipped_samples") if k in metrics}
            append_line(self.plan.work_dir / EVAL_LOG, json.dumps({"iteration": iteration, **summary}))
        if best is None or miou > best:
            best = miou
            if self.dist.is_main:
                path = self.checkpoints.save_best(self.state_dict(iteration, best), iteration, "mIoU", miou)
                for callback in self.callbacks:
                    callback.on_checkpoint(iteration, path, best=True)
        return best
