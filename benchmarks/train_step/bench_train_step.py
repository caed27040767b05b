"""Training-step benchmark (issue 7, item 3b): images/s and peak memory of one optimisation step.

A step is what ``pipelines.engine.trainer.Trainer`` does per iteration without gradient accumulation:
the segmentor's loss under ``torch.autocast`` (bf16) or none (fp32), backward, AdamW over the
recipe's parameter groups (``pipelines.engine.optim.build_optimizer(model, config.optimizer)``:
layer-wise lr decay, or AugReg-B's custom keys), ``zero_grad(set_to_none=True)``, and the loss terms
read back to the host, as the trainer logs them. Inputs are synthetic and already on the device
(random normalised images at the training crop; label maps of 4 x 4 constant rectangles, a few
classes an image as in ADE20K, top rows ignored): the data loader is measured on its own
(``benchmarks/loader``). Weights are randomly initialised: the step's cost does not depend on them.

Models: UperNet ViT-Adapter-B at crop 512 (``upernet-deit-b``, or ``upernet-augreg-b``), batch 2 per
GPU as in the recipe; Mask2Former BEiT-Adapter-L at 896 (``m2f-beit-l``), batch 1 per GPU. Each in
fp32 and bf16, with and without gradient checkpointing (the zoo override ``with_cp``; the recipe's
setting is marked). ``--batch-sizes`` adds other batches.

Timing: ``--warmup`` steps (the first one compiles the Triton kernels and runs the deformable-attention
backend's parity self-check), then ``--steps`` timed steps between ``torch.cuda.synchronize()`` calls;
images/s = batch x steps / elapsed. Peak memory: ``torch.cuda.max_memory_allocated`` (and
``max_memory_reserved``) from just before the first warm-up step: weights, gradients, AdamW state,
activations. The deformable-attention backend each configuration really ran (``cuda_ops`` ``auto``
picks triton on CUDA once its self-check passed) is recorded from the first warm-up step.

Usage (repository root):
    python benchmarks/train_step/bench_train_step.py                      # CUDA: both models, recipe batch
    python benchmarks/train_step/bench_train_step.py --models upernet-deit-b --batch-sizes 2 8 16
    python benchmarks/train_step/bench_train_step.py --cpu-smoke          # tiny models on the CPU
Results go to ``results_<device>.json`` beside this file (``--out`` to change).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.train_step.common import (
    MODELS,
    SMOKE_CROP,
    SMOKE_LABEL,
    BackendRecorder,
    ModelSpec,
    backends_used,
    build_model,
    count_parameters,
    default_out,
    metadata,
    model_config,
    oom_guard,
    peak_memory,
    process_max_rss_mib,
    recipe_with_cp,
    release,
    reset_peak_memory,
    synthetic_labels,
)
from models.config import SegmentorConfig
from pipelines.engine.optim import build_optimizer

HERE = Path(__file__).resolve().parent
WARMUP, STEPS = 5, 20
SMOKE_WARMUP, SMOKE_STEPS = 1, 2
INPUT_POOL = 2  # distinct synthetic batches, cycled
# issue 7, on an H100
TARGET_UPERNET_IMAGES_PER_S = 110.0  # UperNet ViT-Adapter-B 512 training, bf16
TARGET_M2F_MEMORY_GB = 80.0  # Mask2Former BEiT-Adapter-L 896 training at one image per GPU


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The trainer's autocast: none for fp32, bf16 autocast (no loss scaling) for bf16."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    img: torch.Tensor,
    labels: torch.Tensor,
    precision: str,
) -> dict[str, float]:
    """One training iteration as the trainer runs it; returns the loss terms read to the host."""
    with _autocast(img.device, precision):
        losses = model.loss(img, labels)
    losses["loss"].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {key: float(value.detach()) for key, value in losses.items()}


def synthetic_batches(
    config: SegmentorConfig, batch: int, crop: int, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``INPUT_POOL`` (images, labels) batches on ``device``."""
    gen = torch.Generator().manual_seed(0)
    pool = []
    for _ in range(INPUT_POOL):
        img = torch.randn(batch, 3, crop, crop, generator=gen)
        labels = synthetic_labels(batch, (crop, crop), config.num_classes, gen)
        pool.append((img.to(device), labels.to(device)))
    return pool


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    model: nn.Module,
    config: SegmentorConfig,
    row: dict[str, Any],
    *,
    batch: int,
    crop: int,
    precision: str,
    device: torch.device,
    warmup: int,
    steps: int,
) -> None:
    """Warm up, time ``steps`` steps, fill ``row`` with throughput, step times, peak memory, backend."""
    pool = synthetic_batches(config, batch, crop, device)
    model.train()
    model.zero_grad(set_to_none=True)
    release(device)
    reset_peak_memory(device)
    optimizer = build_optimizer(model, config.optimizer)
    try:
        recorder = BackendRecorder()
        with recorder:
            terms = train_step(model, optimizer, *pool[0], precision)
        for step in range(1, warmup):
            terms = train_step(model, optimizer, *pool[step % INPUT_POOL], precision)
        _sync(device)
        times = []
        start = time.perf_counter()
        for step in range(steps):
            t0 = time.perf_counter()
            # the loss terms read to the host end each step synchronised with the device
            terms = train_step(model, optimizer, *pool[step % INPUT_POOL], precision)
            times.append(time.perf_counter() - t0)
        _sync(device)
        elapsed = time.perf_counter() - start
        row.update(
            {
                "status": "ok",
                "images_per_s": batch * steps / elapsed,
                "step_ms": {
                    "mean": elapsed / steps * 1e3,
                    "median": statistics.median(times) * 1e3,
                    "min": min(times) * 1e3,
                    "max": max(times) * 1e3,
                },
                **peak_memory(device),
                "ms_deform_attn": recorder.summary(),
                "optimizer_groups": len(optimizer.param_groups),
                "last_loss": terms["loss"],
                "loss_finite": bool(torch.isfinite(torch.tensor(terms["loss"]))),
            }
        )
    finally:
        del optimizer
        model.zero_grad(set_to_none=True)
        del pool
        release(device)


def run_model(
    spec: ModelSpec,
    *,
    smoke: bool,
    device: torch.device,
    precisions: list[str],
    checkpointing: list[bool],
    batch_sizes: list[int] | None,
    warmup: int,
    steps: int,
    deform_backend: str,
) -> list[dict[str, Any]]:
    """All configurations of one model; a configuration that runs out of memory is recorded as such."""
    rows: list[dict[str, Any]] = []
    recipe_cp = recipe_with_cp(spec)
    for with_cp in checkpointing:
        config = model_config(spec, smoke=smoke, with_cp=with_cp)
        crop = SMOKE_CROP if smoke else config.data.train.crop_size[0]
        batches = batch_sizes or [config.data.train.samples_per_gpu]
        model = None
        base = {
            "model": spec.key,
            "zoo": spec.zoo,
            "tiny_override": smoke,
            "crop": crop,
            "with_cp": with_cp,
            "recipe_with_cp": recipe_cp,
            "recipe_batch_per_gpu": config.data.train.samples_per_gpu,
            "deform_backend_requested": deform_backend,
        }
        build = {**base, "status": "not run"}
        with oom_guard(device, build):
            model = build_model(config, device, deform_backend)
        if model is None:
            rows.append(build)
            print(f"{spec.key:16} cp={with_cp!s:5} building the model ran out of memory")
            continue
        parameters = count_parameters(model)
        for batch in batches:
            for precision in precisions:
                row = {**base, "parameters": parameters, "batch": batch, "precision": precision}
                row["status"] = "not run"
                with oom_guard(device, row):
                    measure(
                        model,
                        config,
                        row,
                        batch=batch,
                        crop=crop,
                        precision=precision,
                        device=device,
                        warmup=warmup,
                        steps=steps,
                    )
                rows.append(row)
                _print_row(row)
        del model
        release(device)
    return rows


def _print_row(row: dict[str, Any]) -> None:
    head = f"{row['model']:16} b{row['batch']:<3} {row['precision']:5} cp={row['with_cp']!s:5}"
    if row["status"] != "ok":
        print(f"{head} {row['status']}")
        return
    memory = row["peak_allocated_GB"]
    used = ",".join(f"{e['backend']}/{e['value_dtype']}x{e['calls']}" for e in row["ms_deform_attn"])
    print(
        f"{head} {row['images_per_s']:8.2f} images/s  step {row['step_ms']['median']:9.1f} ms  "
        f"peak {'-' if memory is None else f'{memory:.2f} GB'}  ms_deform_attn {used}"
    )


def targets(rows: list[dict[str, Any]], device_name: str, smoke: bool) -> list[dict[str, Any]]:
    """The issue's two training targets next to what was measured (evaluated on a GPU run only)."""
    note = (
        "not evaluated: a cpu-smoke run of tiny models"
        if smoke
        else f"measured on {device_name}"
        + ("" if "H100" in device_name else "; the targets are stated for an H100")
    )
    ok = [r for r in rows if r["status"] == "ok"]
    upernet = [r for r in ok if r["model"].startswith("upernet") and r["precision"] == "bf16"]
    best = max(upernet, key=lambda r: r["images_per_s"], default=None)
    m2f = [r for r in rows if r["model"] == "m2f-beit-l" and r.get("batch") == 1]
    m2f_rows = [
        {
            "precision": r["precision"],
            "with_cp": r["with_cp"],
            "status": r["status"],
            "peak_allocated_GB": r.get("peak_allocated_GB"),
            "peak_reserved_GB": r.get("peak_reserved_GB"),
            "fits": None
            if smoke or r["status"] not in ("ok", "out of memory")
            else r["status"] == "ok" and r["peak_allocated_GB"] <= TARGET_M2F_MEMORY_GB,
        }
        for r in m2f
    ]
    fits = [r["fits"] for r in m2f_rows if r["fits"] is not None]
    return [
        {
            "target": "UperNet ViT-Adapter-B 512 training >= 110 images/s per GPU in bf16 (H100)",
            "threshold_images_per_s": TARGET_UPERNET_IMAGES_PER_S,
            "best_bf16_images_per_s": None if smoke or best is None else best["images_per_s"],
            "best_row": None
            if smoke or best is None
            else {k: best[k] for k in ("model", "batch", "with_cp", "peak_allocated_GB")},
            "met": None if smoke or best is None else best["images_per_s"] >= TARGET_UPERNET_IMAGES_PER_S,
            "note": note,
        },
        {
            "target": "Mask2Former BEiT-Adapter-L 896 training at one image per GPU within 80 GB (H100)",
            "threshold_GB": TARGET_M2F_MEMORY_GB,
            "criterion": "the step ran and torch.cuda.max_memory_allocated <= 80e9 bytes "
            "(peak_reserved_GB, what the caching allocator held, is shown beside it)",
            "rows": m2f_rows,
            "met": None if smoke or not fits else any(fits),
            "note": note,
        },
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="tiny overrides of the models on the CPU (not a benchmark)"
    )
    parser.add_argument(
        "--models",
        nargs="+",
        choices=sorted(MODELS),
        default=["upernet-deit-b", "m2f-beit-l"],
        help="models to run (default: upernet-deit-b m2f-beit-l)",
    )
    parser.add_argument(
        "--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"], help="autocast"
    )
    parser.add_argument(
        "--checkpointing",
        nargs="+",
        choices=["off", "on"],
        default=["off", "on"],
        help="gradient checkpointing (zoo override with_cp)",
    )
    parser.add_argument(
        "--batch-sizes", nargs="+", type=int, help="batches per GPU (default: the recipe's, 2 / 1)"
    )
    parser.add_argument(
        "--warmup", type=int, help=f"warm-up steps, >= 1 (default {WARMUP}; smoke {SMOKE_WARMUP})"
    )
    parser.add_argument("--steps", type=int, help=f"timed steps (default {STEPS}; smoke {SMOKE_STEPS})")
    parser.add_argument(
        "--deform-backend",
        choices=["auto", "pytorch", "triton"],
        default="auto",
        help="cuda_ops.ms_deform_attn backend of the model: auto (default), pytorch (the reference), triton",
    )
    parser.add_argument(
        "--tf32", action="store_true", help="allow TF32 matmuls (off by default, as the trainer)"
    )
    parser.add_argument("--out", type=Path, help="results JSON (default: results_<device>.json here)")
    args = parser.parse_args()

    if args.cpu_smoke:
        device = torch.device("cpu")
        # one thread: OpenMP threads spin-waiting for a busy shared core make a smoke run 10x slower
        torch.set_num_threads(1)
        default_warmup, default_steps = SMOKE_WARMUP, SMOKE_STEPS
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device: run on a GPU, or pass --cpu-smoke")
        device = torch.device("cuda")
        default_warmup, default_steps = WARMUP, STEPS
    warmup = default_warmup if args.warmup is None else args.warmup
    steps = default_steps if args.steps is None else args.steps
    if warmup < 1 or steps < 1:
        parser.error("--warmup and --steps must be >= 1 (the first warm-up step records the backend)")
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    mode = SMOKE_LABEL if args.cpu_smoke else "cuda"
    meta = {"smoke": args.cpu_smoke, **metadata(device, mode)}
    print(f"device {meta['device']}: torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}")

    rows: list[dict[str, Any]] = []
    for key in args.models:
        rows += run_model(
            MODELS[key],
            smoke=args.cpu_smoke,
            device=device,
            precisions=args.precisions,
            checkpointing=[c == "on" for c in args.checkpointing],
            batch_sizes=args.batch_sizes,
            warmup=warmup,
            steps=steps,
            deform_backend=args.deform_backend,
        )
    meta["timing"] = (
        f"{warmup} warm-up steps, then {steps} timed steps between synchronisations; images/s = "
        "batch x steps / elapsed; step_ms from the host clock (each step ends synchronised: the loss "
        "terms are read to the host)"
    )
    meta["inputs"] = "synthetic, on the device: randn images at the crop, labels of 4x4 constant rectangles"
    meta["ms_deform_attn_backends"] = backends_used(rows)
    meta["process_max_rss_MiB"] = process_max_rss_mib()
    results = {"meta": meta, "rows": rows, "targets": targets(rows, meta["device"], args.cpu_smoke)}
    for target in results["targets"]:
        print(f"target: {target['target']}: met={target['met']} ({target['note']})")
    out = args.out or default_out(HERE, device, args.cpu_smoke)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
