"""Iteration-based trainer with the reference recipe (recipes.md 2.3, 2.6).

* The recipe's global batch (16) is kept whatever the number of processes: per-process batch x
  processes x gradient-accumulation steps; a loud warning when it cannot be matched exactly. The
  accumulation slots of one process read what the ranks of a larger run would read (the data
  stream's virtual ranks), so the split of the global batch does not change the samples or the
  BatchNorm groups.
* fp32 by default like the reference; bf16 autocast, or fp16 autocast with loss scaling, as options.
* DDP through ``torchrun`` (gloo on CPU, NCCL on CUDA), BatchNorm converted to SyncBatchNorm on CUDA.
* Each iteration sets every group's lr by the poly + warmup rule before the step.
* Checkpoints every N iterations (atomic, latest K kept) and on SIGTERM; rerunning resumes from the
  latest, including optimizer, scaler, RNG states and the data-stream position (the stream is a
  pure function of the micro-step, so resuming is exact).
* Evaluation every N iterations through a callback, keeping the best-mIoU checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import resource
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from models.config import SegmentorConfig
from pipelines.engine.checkpoints import CheckpointManager, write_text_atomic
from pipelines.engine.distributed import DistInfo, reduce_mean
from pipelines.engine.optim import build_optimizer
from pipelines.engine.schedule import apply_lr

log = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16", "fp16"]
FP16_INIT_SCALE = 512.0  # the fp16 key of the DeiT/AugReg configs (loss_scale init_scale 512)
CHECKPOINT_FORMAT = "vitadapter-train"
TRAIN_LOG = "train_log.jsonl"


class TrainingInterruptedError(RuntimeError):
    """SIGTERM arrived; a checkpoint was written and the run can be resumed by rerunning it."""


class Callback(Protocol):
    """Receives what the trainer reports (rank 0 only)."""

    def on_log(self, iteration: int, values: dict[str, float]) -> None: ...

    def on_eval(self, iteration: int, metrics: dict[str, Any]) -> None: ...

    def on_checkpoint(self, iteration: int, path: Path, best: bool) -> None: ...


@dataclass(frozen=True)
class TrainSettings:
    """Run-level knobs (everything else comes from the zoo entry's recipe).

    Attributes:
        work_dir: run folder (checkpoints, logs); rerunning with the same folder resumes.
        max_iters: iterations of this run (default: the recipe's); the schedule spans it.
        batch_size: images per process and micro-step (default: the recipe's samples_per_gpu).
        global_batch: images per optimizer step (default: the recipe's, 16).
        precision: ``fp32`` (reference), ``bf16`` or ``fp16`` (with loss scaling).
        eval_interval, checkpoint_interval, log_interval: in iterations (defaults: the recipe's).
        keep_checkpoints: iteration checkpoints kept (the reference keeps 1).
        seed: seed of the model initialisation, the data stream and the augmentations.
        deterministic: deterministic algorithms (exact resume, slower on GPU).
        sync_bn: convert BatchNorm to SyncBatchNorm in multi-GPU runs.
        progress: show a progress bar on rank 0.
    """

    work_dir: Path
    max_iters: int | None = None
    batch_size: int | None = None
    global_batch: int | None = None
    precision: Precision = "fp32"
    eval_interval: int | None = None
    checkpoint_interval: int | None = None
    log_interval: int | None = None
    keep_checkpoints: int = 1
    seed: int = 0
    deterministic: bool = False
    sync_bn: bool = True
    progress: bool = True


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

    def forward(self, img: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model.loss(img, labels)


def plan_batch(config: SegmentorConfig, settings: TrainSettings, world_size: int) -> tuple[int, int, int]:
    """(per-process batch, accumulation steps, effective global batch); warns when it differs from the recipe."""
    per_process = settings.batch_size or config.data.train.samples_per_gpu
    wanted = settings.global_batch or config.data.train.global_batch
    accumulation = max(1, math.ceil(wanted / (per_process * world_size)))
    effective = per_process * world_size * accumulation
    if effective != wanted:
        log.warning(
            "!!! effective batch %d (%d per process x %d processes x %d accumulation) differs from the recipe's "
            "global batch %d: results are not comparable with the reference",
            effective,
            per_process,
            world_size,
            accumulation,
            wanted,
        )
    return per_process, accumulation, effective


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


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


class Trainer:
    """Train one segmentor with its recipe.

    Args:
        model: the segmentor (``loss(img, labels)``), on the CPU, already initialised.
        config: its zoo entry (optimizer, schedule, batch layout).
        settings: run-level knobs.
        dist_info: process placement from :func:`pipelines.engine.distributed.init_distributed`.
        train_batches: ``(start_step, batch_size, micro_batches) -> iterator`` over steps, each item the
            ``micro_batches`` batches ``{"image": (B, 3, H, W) float, "label": (B, H, W) int64}`` of one
            step for this process (a list, or one dict when ``micro_batches`` is 1); a pure function
            of the step, so resuming is exact.
        evaluate: ``(model) -> metrics`` with at least ``mIoU``, run on every process (it all-reduces).
        callbacks: reporting hooks (called on rank 0).
        extra_state: JSON-able facts stored in every checkpoint (config name, overrides, ...).
    """

    def __init__(
        self,
        model: nn.Module,
        config: SegmentorConfig,
        settings: TrainSettings,
        dist_info: DistInfo,
        train_batches: Callable[[int, int, int], Iterator[Any]],
        *,
        evaluate: Callable[[nn.Module], dict[str, Any]] | None = None,
        callbacks: list[Callback] | None = None,
        extra_state: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.settings = settings
        self.dist = dist_info
        self.train_batches = train_batches
        self.evaluate_fn = evaluate
        self.callbacks = callbacks or []
        self.extra_state = extra_state or {}
        schedule = config.schedule
        self.max_iters = settings.max_iters or schedule.max_iters
        self.eval_interval = settings.eval_interval or schedule.eval_interval
        self.checkpoint_interval = settings.checkpoint_interval or schedule.checkpoint_interval
        self.log_interval = settings.log_interval or schedule.log_interval
        self.batch_size, self.accumulation, self.effective_batch = plan_batch(
            config, settings, dist_info.world_size
        )
        self.checkpoints = CheckpointManager(settings.work_dir, keep=settings.keep_checkpoints)

        if dist_info.distributed and dist_info.device.type == "cuda" and settings.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model.to(dist_info.device)
        self.optimizer = build_optimizer(self.model, config.optimizer)
        self.scaler = torch.amp.GradScaler(
            dist_info.device.type, enabled=settings.precision == "fp16", init_scale=FP16_INIT_SCALE
        )
        loss_module = _LossModule(self.model)
        if dist_info.distributed:
            device_ids = [dist_info.device.index] if dist_info.device.type == "cuda" else None
            loss_module = DistributedDataParallel(loss_module, device_ids=device_ids)
        self.loss_module = loss_module
        self._stop_requested = False

    # -- state -------------------------------------------------------------------------------
    def state_dict(self, iteration: int, best: float | None) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.config.name,
            "iteration": iteration,
            "state_dict": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": _rng_state(),
            "data": {"step": iteration, "micro_batches": self.accumulation, "seed": self.settings.seed},
            "best_miou": best,
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self.settings).items()},
            **self.extra_state,
        }

    def _resume(self) -> tuple[int, float | None]:
        state = self.checkpoints.load_latest()
        if state is None:
            return 0, None
        if state.get("config") != self.config.name:
            raise ValueError(
                f"{self.settings.work_dir} holds a run of {state.get('config')!r}, not {self.config.name!r}; "
                "use another work dir"
            )
        self.model.load_state_dict(state["state_dict"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        return int(state["iteration"]), state.get("best_miou")

    # -- signals -----------------------------------------------------------------------------
    def _on_sigterm(self, signum: int, frame: Any) -> None:
        log.warning("SIGTERM: finishing this iteration, writing a checkpoint and stopping")
        self._stop_requested = True

    # -- loop --------------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.settings.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.settings.precision == "bf16" else torch.float16
        return torch.autocast(self.dist.device.type, dtype=dtype)

    def _step(self, iteration: int, steps: Iterator[Any]) -> dict[str, float]:
        terms: dict[str, float] = {}
        bundle = next(steps)
        micro_batches = [bundle] if isinstance(bundle, dict) else list(bundle)
        if len(micro_batches) != self.accumulation:
            raise RuntimeError(
                f"the data stream gave {len(micro_batches)} micro-batches, expected {self.accumulation}"
            )
        for k, batch in enumerate(micro_batches):
            torch.manual_seed(
                micro_batch_seed(self.settings.seed, iteration, self.dist.rank * self.accumulation + k)
            )
            img = batch["image"].to(self.dist.device, non_blocking=True)
            labels = batch["label"].to(self.dist.device, non_blocking=True)
            sync = k == self.accumulation - 1 or not isinstance(self.loss_module, DistributedDataParallel)
            context = contextlib.nullcontext() if sync else self.loss_module.no_sync()
            with context:
                with self._autocast():
                    losses = self.loss_module(img, labels)
                self.scaler.scale(losses["loss"] / self.accumulation).backward()
            for key, value in losses.items():
                terms[key] = terms.get(key, 0.0) + float(value.detach()) / self.accumulation
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return terms

    def _save(self, iteration: int, best: float | None) -> Path | None:
        path = None
        if self.dist.is_main:
            path = self.checkpoints.save(self.state_dict(iteration, best), iteration)
            for callback in self.callbacks:
                callback.on_checkpoint(iteration, path, best=False)
        return path

    def fit(self) -> TrainResult:
        """Train to ``max_iters`` (resuming if the work dir holds a checkpoint)."""
        if self.settings.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        start, best = self._resume()
        if self.dist.is_main:
            self._truncate_log(start)
        if start >= self.max_iters:
            log.info("nothing to do: the run already reached %d iterations", start)
            last = self.checkpoints.latest()
            return TrainResult(start, last, self._best_path(), best)
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        self.model.train()
        batches = self.train_batches(start, self.batch_size, self.accumulation)
        history: list[dict[str, float]] = []
        bar = tqdm(
            total=self.max_iters,
            initial=start,
            disable=not (self.settings.progress and self.dist.is_main),
            desc=self.config.name,
            dynamic_ncols=True,
        )
        last_path: Path | None = None
        window_start, window_iters = time.perf_counter(), 0
        try:
            for iteration in range(start, self.max_iters):
                lr = apply_lr(self.optimizer, iteration, self.config.schedule, self.max_iters)
                terms = self._step(iteration, batches)
                done = iteration + 1
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
                            "peak_memory_mb": _peak_memory_mb(self.dist.device),
                        }
                    )
                    history.append({"iteration": done, **values})
                    if self.dist.is_main:
                        self._append_log({"iteration": done, **values})
                    bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}")
                    if self.dist.is_main:
                        log.info(
                            "iter %d/%d %s",
                            done,
                            self.max_iters,
                            " ".join(f"{k}={v:.4g}" for k, v in values.items()),
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
                        f"stopped by SIGTERM after iteration {done}; rerun to resume"
                    )
        finally:
            bar.close()
            signal.signal(signal.SIGTERM, previous)
        return TrainResult(
            self.max_iters, last_path or self.checkpoints.latest(), self._best_path(), best, history
        )

    def _append_log(self, record: dict[str, Any]) -> None:
        with (self.settings.work_dir / TRAIN_LOG).open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def _truncate_log(self, iteration: int) -> None:
        """Drop log lines written after the checkpoint a resumed run starts from."""
        path = self.settings.work_dir / TRAIN_LOG
        if not path.is_file():
            return
        kept = [
            line
            for line in path.read_text().splitlines()
            if line and json.loads(line)["iteration"] <= iteration
        ]
        write_text_atomic(path, "".join(line + "\n" for line in kept))

    def _best_path(self) -> Path | None:
        path = self.settings.work_dir / "best_mIoU.pth"
        return path if path.is_file() else None

    def _evaluate(self, iteration: int, best: float | None) -> float | None:
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
        if best is None or miou > best:
            best = miou
            if self.dist.is_main:
                path = self.checkpoints.save_best(self.state_dict(iteration, best), iteration, "mIoU", miou)
                for callback in self.callbacks:
                    callback.on_checkpoint(iteration, path, best=True)
        return best
