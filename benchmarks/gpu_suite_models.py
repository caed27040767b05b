"""Steps c, d and e of the GPU suite (``benchmarks/gpu_suite.py``): training step, evaluation, distributed.

c. One optimisation step of UperNet ViT-Adapter-B 512 and Mask2Former BEiT-Adapter-L 896, through
   ``benchmarks/train_step/bench_train_step.measure`` (images/s, peak memory, the deformable-attention
   backend that ran); random weights, synthetic inputs on the device.
d. UperNet ViT-Adapter-B through the real evaluator (``benchmarks/eval/bench_eval.measure``:
   ``pipelines.engine.evaluator.evaluate`` with sliding windows), single-scale and multi-scale + flip,
   on 512 x 683 images; the time of the 2,000 ADE20K validation images projected from it.
e. The distributed path on one device: a one-process NCCL (gloo on the CPU) group over loopback TCP,
   the project's ``init_distributed`` and ``Trainer`` (SyncBatchNorm conversion on CUDA, DDP, the
   all-reduce of the logged losses), 20 bf16 iterations of a tiny UperNet on one fixed batch.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import socket
import tempfile
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from benchmarks.eval import bench_eval as be
from benchmarks.train_step import bench_train_step as bts
from benchmarks.train_step.common import (
    MODELS,
    SMOKE_CROP,
    SMOKE_EVAL_IMAGE,
    BackendRecorder,
    build_model,
    count_parameters,
    model_config,
    oom_guard,
    recipe_with_cp,
    release,
    synthetic_labels,
)

# --- the project's pipeline API: the one place to fix if its modules move ---------------------------
from pipelines.engine.distributed import DistInfo, init_distributed, shutdown
from pipelines.engine.plan import BatchPlan, TrainPlan
from pipelines.engine.trainer import Trainer
from pipelines.engine.views import InferenceSettings

# ------------------------------------------------------------------------------------------------------

log = logging.getLogger(__name__)

UPERNET, M2F = "upernet-deit-b", "m2f-beit-l"
TRAIN_WARMUP, TRAIN_STEPS = 3, 10
DRY_WARMUP, DRY_STEPS = 1, 1
TARGET_UPERNET_AMBITIOUS = 160.0  # images/s, bf16 (H100)
ADE20K_VAL_IMAGES = 2000
TARGET_VAL_SECONDS = {"ss": 30.0, "ms": 8 * 60.0}  # H100, one GPU
# (mode, precision, warm-up images, timed images); dry run: one and one
EVAL_PLAN = (("ss", "bf16", 2, 10), ("ms", "bf16", 1, 3), ("ss", "fp32", 2, 10), ("ms", "fp32", 1, 3))
DIST_ITERATIONS, DRY_DIST_ITERATIONS = 20, 3
DIST_LR = 1e-3  # no warm-up: the loss must fall within the few iterations
DIST_BATCH = 2


def train_plan(dry_run: bool) -> list[tuple[str, bool, list[tuple[int, str]]]]:
    """(model, with_cp, [(batch, precision), ...]) groups in priority order (one model build a group)."""
    upernet = [(b, p) for p in ("bf16", "fp32") for b in ((2,) if dry_run else (8, 16))]
    m2f = [(1, p) for p in ("bf16", "fp32")]
    return [(UPERNET, False, upernet), (M2F, True, m2f), (UPERNET, True, upernet)]


def step_train(ctx: Any, record: dict[str, Any]) -> str:
    """Step c: images/s and peak memory of the training step; out-of-memory is recorded per configuration."""
    device, rows, skipped = ctx.device, [], []
    warmup, steps = (DRY_WARMUP, DRY_STEPS) if ctx.dry_run else (TRAIN_WARMUP, TRAIN_STEPS)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32 matmuls in the fp32 rows
    record["figures"] = figures = {
        "device": str(device),
        "fp32_matmul_precision": "high (TF32)",
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "timing": f"{warmup} warm-up steps, then {steps} timed steps (bench_train_step.measure)",
        "rows": rows,
        "skipped": skipped,
    }
    errors = 0
    try:
        for key, with_cp, combos in train_plan(ctx.dry_run):
            if ctx.expired():
                skipped += [{"model": key, "with_cp": with_cp, "batch": b, "precision": p} for b, p in combos]
                continue
            spec = MODELS[key]
            config = model_config(spec, smoke=ctx.dry_run, with_cp=with_cp)
            base = {
                "model": key,
                "zoo": spec.zoo,
                "tiny_override": ctx.dry_run,
                "crop": SMOKE_CROP if ctx.dry_run else config.data.train.crop_size[0],
                "with_cp": with_cp,
                "recipe_with_cp": recipe_with_cp(spec),
            }
            build: dict[str, Any] = {**base, "status": "not run"}
            model = None
            with oom_guard(device, build):
                model = build_model(config, device, "auto")
            if model is None:
                rows.append(build)
                continue
            for batch, precision in combos:
                row = {**base, "parameters": count_parameters(model), "batch": batch, "precision": precision}
                if ctx.expired():
                    skipped.append({**row, "status": "skipped: step budget spent"})
                    continue
                row["status"] = "not run"
                try:
                    with oom_guard(device, row):
                        bts.measure(
                            model,
                            config,
                            row,
                            batch=batch,
                            crop=row["crop"],
                            precision=precision,
                            device=device,
                            warmup=warmup,
                            steps=steps,
                        )
                except Exception as exc:  # recorded per configuration; the others still run
                    row.update(status="error", error=repr(exc), traceback=traceback.format_exc())
                    errors += 1
                    release(device)
                log.info(
                    "train %s b%d %s cp=%s: %s, %s images/s, peak %s GB",
                    key,
                    batch,
                    precision,
                    with_cp,
                    row["status"],
                    row.get("images_per_s"),
                    row.get("peak_allocated_GB"),
                )
                rows.append(row)
                ctx.save()
            del model
            release(device)
    finally:
        torch.set_float32_matmul_precision(previous)
    targets = bts.targets(
        rows, figures["device"] if device.type == "cpu" else torch.cuda.get_device_name(device), ctx.dry_run
    )
    targets[0]["ambitious_images_per_s"] = TARGET_UPERNET_AMBITIOUS
    figures["targets"] = record["targets"] = targets
    record["headline"] = _train_headline(rows)
    if errors:
        return "error"
    return "timeout" if skipped else "ok"


def _train_headline(rows: list[dict[str, Any]]) -> str:
    ok = [r for r in rows if r.get("status") == "ok"]
    upernet = max(
        (r for r in ok if r["model"] == UPERNET and r["precision"] == "bf16"),
        key=lambda r: r["images_per_s"],
        default=None,
    )
    parts = []
    if upernet is not None:
        parts.append(
            f"UperNet-B bf16 {upernet['images_per_s']:.1f} img/s (b{upernet['batch']}, "
            f"cp={upernet['with_cp']}) vs >= 110 (160)"
        )
    m2f = [r for r in rows if r["model"] == M2F and "precision" in r]
    for r in m2f:
        memory = r.get("peak_allocated_GB")
        shown = r["status"] if memory is None else f"{memory:.1f} GB"
        parts.append(f"M2F-L {r['precision']} {shown} vs <= 80 GB")
    return "; ".join(parts) or "no configuration ran"


def step_eval(ctx: Any, record: dict[str, Any]) -> str:
    """Step d: the real evaluator, single-scale and multi-scale + flip; projected ADE20K val time."""
    device, rows, skipped = ctx.device, [], []
    spec = MODELS[UPERNET]
    config = model_config(spec, smoke=ctx.dry_run, with_cp=None, for_eval=True)
    image_size = SMOKE_EVAL_IMAGE if ctx.dry_run else be.IMAGE_SIZE
    record["figures"] = figures = {
        "device": str(device),
        "model": UPERNET,
        "zoo": spec.zoo,
        "image_size": list(image_size),
        "projection": f"{ADE20K_VAL_IMAGES} images / images_per_s, one device, one image at a time as the "
        "evaluator runs; ADE20K's validation images vary in size around this one",
        "rows": rows,
        "skipped": skipped,
    }
    base = {"model": UPERNET, "zoo": spec.zoo, "tiny_override": ctx.dry_run, "image_size": list(image_size)}
    build: dict[str, Any] = {**base, "status": "not run"}
    model = None
    with oom_guard(device, build):
        model = build_model(config, device, "auto").eval()
    if model is None:
        rows.append(build)
        return "error"
    for mode, precision, warmup, images in EVAL_PLAN:
        if ctx.dry_run:
            warmup, images = 1, 1
        settings = InferenceSettings.from_config(config, precision=precision)
        row = {
            **base,
            "mode": mode,
            "precision": precision,
            "inference": settings.mode,
            "crop": list(settings.crop),
            "stride": list(settings.stride),
            "batch_windows": settings.batch_windows,
            "status": "not run",
        }
        if ctx.expired():
            skipped.append({**row, "status": "skipped: step budget spent"})
            continue
        with oom_guard(device, row):
            be.measure(
                model,
                config,
                row,
                mode=mode,
                settings=settings,
                device=device,
                image_size=image_size,
                images=images,
                warmup_images=warmup,
            )
        if row["status"] == "ok":
            row["projected_val_s"] = ADE20K_VAL_IMAGES / row["images_per_s"]
        rows.append(row)
        ctx.save()
    del model
    release(device)
    targets = []
    for mode, limit in TARGET_VAL_SECONDS.items():
        measured = [r for r in rows if r.get("mode") == mode and "projected_val_s" in r]
        best = min(measured, key=lambda r: r["projected_val_s"], default=None)
        targets.append(
            {
                "target": f"ADE20K val ({ADE20K_VAL_IMAGES} images) {mode} < {limit:g} s (H100)",
                "mode": mode,
                "threshold_s": limit,
                "best_projected_s": None if best is None else best["projected_val_s"],
                "precision": None if best is None else best["precision"],
                "met": None if ctx.dry_run or best is None else best["projected_val_s"] < limit,
            }
        )
    figures["targets"] = record["targets"] = targets
    record["headline"] = "; ".join(
        f"{t['mode']} {t['best_projected_s']:.0f} s ({t['precision']}) vs < {t['threshold_s']:g} s"
        if t["best_projected_s"] is not None
        else f"{t['mode']} not measured"
        for t in targets
    )
    return "timeout" if skipped else "ok"


@dataclasses.dataclass(frozen=True)
class _OneRankGroup(DistInfo):
    """A placement that counts as distributed while a process group is up, even of one process.

    The trainer converts BatchNorm and wraps DDP only when ``DistInfo.distributed`` (more than one
    process); on one device this is how the suite runs that path.
    """

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def step_distributed(ctx: Any, record: dict[str, Any]) -> str:
    """Step e: one-process group, SyncBatchNorm conversion, DDP and the real trainer; the loss must fall."""
    cuda = ctx.device.type == "cuda"
    backend = "nccl" if cuda else "gloo"
    iterations = DRY_DIST_ITERATIONS if ctx.dry_run else DIST_ITERATIONS
    # the project's helper first (WORLD_SIZE unset: it picks the device and creates no group), then
    # the one-process group over loopback TCP
    info = init_distributed("cuda" if cuda else "cpu")
    init = f"tcp://127.0.0.1:{_free_port()}"
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method=init, rank=0, world_size=1)
    try:
        group = _OneRankGroup(**{f.name: getattr(info, f.name) for f in dataclasses.fields(info)})
        config = model_config(MODELS[UPERNET], smoke=True, with_cp=False)
        model = build_model(config, torch.device("cpu"), "auto")
        batchnorms = _count(model, nn.modules.batchnorm._BatchNorm)
        with tempfile.TemporaryDirectory(prefix="gpu_suite_dist_") as work_dir:
            plan = TrainPlan(
                entry=config.name,
                work_dir=Path(work_dir),
                optimizer=dataclasses.replace(config.optimizer, lr=DIST_LR),
                schedule=dataclasses.replace(
                    config.schedule,
                    max_iters=iterations,
                    warmup_iters=0,
                    log_interval=1,
                    eval_interval=iterations,
                    checkpoint_interval=iterations,
                ),
                batch=BatchPlan(DIST_BATCH, 1, 1, config.data.train.global_batch),
                precision="bf16",
                progress=False,
            )
            trainer = Trainer(model, plan, group, _fixed_batches(config.num_classes))
            recorder = BackendRecorder()
            with recorder:
                result = trainer.fit()
        losses = [h["loss"] for h in result.history]
        sync_bn = _count(trainer.model, nn.SyncBatchNorm)
        figures = {
            "backend": dist.get_backend(),
            "init_method": init,
            "world_size": dist.get_world_size(),
            "device": str(group.device),
            "batchnorm_modules": batchnorms,
            "sync_bn_modules": sync_bn,
            "sync_bn_note": "the trainer converts on CUDA only; "
            "with one rank SyncBatchNorm uses local statistics",
            "ddp": isinstance(trainer.loss_module, DistributedDataParallel),
            "precision": plan.precision,
            "iterations": result.iterations,
            "losses": losses,
            "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None,
            "loss_decreased": bool(losses) and all(map(math.isfinite, losses)) and losses[-1] < losses[0],
            "ms_deform_attn": recorder.summary(),
        }
    finally:
        shutdown()
    record["figures"] = figures
    checks = {
        "loss_decreased": figures["loss_decreased"],
        "ddp": figures["ddp"],
        "sync_bn": sync_bn == batchnorms > 0 if cuda else sync_bn == 0,
        "iterations": figures["iterations"] == iterations,
    }
    figures["checks"] = checks
    record["headline"] = (
        f"{backend}, {sync_bn}/{batchnorms} SyncBN, loss {figures['first_loss']:.3f} -> "
        f"{figures['last_loss']:.3f} in {iterations} bf16 iterations"
    )
    return "ok" if all(checks.values()) else "failed"


def _fixed_batches(num_classes: int) -> Any:
    """The trainer's ``train_batches``: one synthetic batch, every step (so the loss must fall)."""

    def batches(start: int, batch_size: int, micro_batches: int) -> Iterator[Any]:
        gen = torch.Generator().manual_seed(0)
        item = {
            "image": torch.randn(batch_size, 3, SMOKE_CROP, SMOKE_CROP, generator=gen),
            "label": synthetic_labels(batch_size, (SMOKE_CROP, SMOKE_CROP), num_classes, gen),
        }
        return itertools.repeat(item if micro_batches == 1 else [item] * micro_batches)

    return batches
