"""Evaluation benchmark (issue 7, item 3c): images/s and peak memory of the real evaluator.

Each image goes through ``pipelines.engine.evaluator.evaluate``, the code of ``vitadapter evaluate``
and the pipeline's eval stage: the test transform ``pipelines.config.specs.test_pipeline(config, "ss" | "ms")``
(keep-ratio resize, normalisation, and for ``ms`` the config's ratios with flip), sliding-window
inference with ``InferenceSettings.from_config(config)`` (the recipe's crop and stride, 4 windows a
forward), one resize to the original size and softmax per view, the average over views, the argmax
and the metric update, all timed. Images are synthetic 512 x 683 (height x width) uint8 noise: a
512-short-side image, the size issue 7 asks for, which the 512 test scale keeps (rounded up to
512 x 704, a multiple of 32).

Models: UperNet ViT-Adapter-B 512 (``upernet-deit-b``: single-scale 1 view, 2 windows of 512;
multi-scale ratios 0.5-1.75 with flip, 12 views, 56 windows) and Mask2Former BEiT-Adapter-L 896
(``m2f-beit-l``: its 896 test scale resizes the image to 896 x 1216, 2 windows of 896; multi-scale
short sides 640/768/896 padded to 896, with flip, 6 views, 10 windows). Weights are random
(inference cost does not depend on them); precision fp32 (the goldens) and bf16 autocast
(``--precisions fp16`` adds the fp16 autocast the reference used for DeiT-B).

Timing: ``--warmup-images`` images (the first compiles the Triton kernels and runs the deformable-attention
self-check), then ``--images`` images between ``torch.cuda.synchronize()`` calls. Peak memory:
``torch.cuda.max_memory_allocated`` (and reserved) over the warm-up and timed images, weights included.
The deformable-attention backend really run is recorded from the first warm-up image.

Usage (repository root):
    python benchmarks/eval/bench_eval.py                    # CUDA: both models, ss and ms, fp32 and bf16
    python benchmarks/eval/bench_eval.py --models upernet-deit-b --modes ss --precisions bf16
    python benchmarks/eval/bench_eval.py --cpu-smoke        # tiny models on the CPU (not a benchmark)
Results go to ``results_<device>.json`` beside this file (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.train_step.common import (
    MODELS,
    SMOKE_EVAL_IMAGE,
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
    release,
    reset_peak_memory,
)
from models.config import SegmentorConfig
from pipelines.config.specs import test_pipeline
from pipelines.engine.evaluator import evaluate
from pipelines.engine.inference import slide_windows
from pipelines.engine.views import InferenceSettings

HERE = Path(__file__).resolve().parent
IMAGE_SIZE = (512, 683)  # height, width: a 512-short-side image
IMAGES, WARMUP_IMAGES = 10, 2
SMOKE_IMAGES, SMOKE_WARMUP_IMAGES = 2, 1
IMAGE_POOL = 4  # distinct synthetic images, cycled


def synthetic_items(
    count: int, size: tuple[int, int], num_classes: int, seed: int = 0
) -> list[dict[str, Any]]:
    """``count`` evaluation items: (H, W, 3) uint8 BGR noise and (H, W) labels of 4 x 4 rectangles."""
    rng = np.random.default_rng(seed)
    height, width = size
    pool = []
    for _ in range(min(count, IMAGE_POOL)):
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        coarse = rng.integers(0, num_classes, (4, 4))
        label = coarse[np.arange(height) * 4 // height][:, np.arange(width) * 4 // width].astype(np.uint8)
        pool.append({"image": image, "label": label})
    return [pool[i % len(pool)] for i in range(count)]


def forward_plan(config: SegmentorConfig, mode: str, settings: InferenceSettings, image: np.ndarray) -> dict:
    """Views, windows and forward passes per image of this pipeline (counted, not timed)."""
    views = test_pipeline(config, mode).views(image)
    windows = [len(slide_windows(*v.image.shape[1:], settings.crop, settings.stride)) for v in views]
    if settings.mode == "whole":
        windows = [1] * len(views)
    return {
        "views": len(views),
        "view_sizes": sorted({tuple(v.image.shape[1:]) for v in views}),
        "windows": sum(windows),
        "forward_passes": sum(-(-w // settings.batch_windows) for w in windows),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    model: nn.Module,
    config: SegmentorConfig,
    row: dict[str, Any],
    *,
    mode: str,
    settings: InferenceSettings,
    device: torch.device,
    image_size: tuple[int, int],
    images: int,
    warmup_images: int,
) -> None:
    """Warm up, then time ``images`` images through ``evaluate``; fill ``row``."""
    pipeline = test_pipeline(config, mode)
    items = synthetic_items(warmup_images + images, image_size, config.num_classes)
    row.update(forward_plan(config, mode, settings, items[0]["image"]))
    common = {"num_classes": config.num_classes, "device": device, "progress": False}
    release(device)
    reset_peak_memory(device)
    recorder = BackendRecorder()
    with recorder:
        evaluate(model, items[:1], pipeline, settings, **common)
    if warmup_images > 1:
        evaluate(model, items[1:warmup_images], pipeline, settings, **common)
    _sync(device)
    start = time.perf_counter()
    metrics = evaluate(model, items[warmup_images:], pipeline, settings, **common)
    _sync(device)
    elapsed = time.perf_counter() - start
    if metrics["num_images"] != images:
        raise RuntimeError(f"evaluated {metrics['num_images']} images, expected {images}")
    row.update(
        {
            "status": "ok",
            "images_per_s": images / elapsed,
            "s_per_image": elapsed / images,
            "windows_per_s": row["windows"] * images / elapsed,
            **peak_memory(device),
            "ms_deform_attn": recorder.summary(),
        }
    )


def run_model(
    spec: ModelSpec,
    *,
    smoke: bool,
    device: torch.device,
    modes: list[str],
    precisions: list[str],
    image_size: tuple[int, int],
    images: int,
    warmup_images: int,
    batch_windows: int | None,
    deform_backend: str,
) -> list[dict[str, Any]]:
    """Every (mode, precision) of one model."""
    config = model_config(spec, smoke=smoke, with_cp=None, for_eval=True)
    base = {
        "model": spec.key,
        "zoo": spec.zoo,
        "tiny_override": smoke,
        "image_size": list(image_size),
        "test_scale": list(config.data.eval.img_scale),
        "deform_backend_requested": deform_backend,
    }
    build = {**base, "status": "not run"}
    model = None
    with oom_guard(device, build):
        model = build_model(config, device, deform_backend).eval()
    if model is None:
        print(f"{spec.key:16} building the model ran out of memory")
        return [build]
    rows = []
    for mode in modes:
        for precision in precisions:
            settings = InferenceSettings.from_config(config, precision=precision, batch_windows=batch_windows)
            row = {
                **base,
                "parameters": count_parameters(model),
                "mode": mode,
                "precision": precision,
                "inference": settings.mode,
                "crop": list(settings.crop),
                "stride": list(settings.stride),
                "batch_windows": settings.batch_windows,
                "status": "not run",
            }
            with oom_guard(device, row):
                measure(
                    model,
                    config,
                    row,
                    mode=mode,
                    settings=settings,
                    device=device,
                    image_size=image_size,
                    images=images,
                    warmup_images=warmup_images,
                )
            rows.append(row)
            _print_row(row)
    del model
    release(device)
    return rows


def _print_row(row: dict[str, Any]) -> None:
    head = f"{row['model']:16} {row['mode']} {row['precision']:5}"
    if row["status"] != "ok":
        print(f"{head} {row['status']}")
        return
    memory = row["peak_allocated_GB"]
    used = ",".join(f"{e['backend']}/{e['value_dtype']}x{e['calls']}" for e in row["ms_deform_attn"])
    print(
        f"{head} {row['images_per_s']:8.3f} images/s  {row['views']:2} views  {row['windows']:3} windows "
        f"{row['forward_passes']:3} forwards an image  peak {'-' if memory is None else f'{memory:.2f} GB'}  "
        f"ms_deform_attn {used}"
    )


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
        "--modes", nargs="+", choices=["ss", "ms"], default=["ss", "ms"], help="single- / multi-scale + flip"
    )
    parser.add_argument(
        "--precisions", nargs="+", choices=["fp32", "bf16", "fp16"], default=["fp32", "bf16"], help="autocast"
    )
    parser.add_argument(
        "--image-size",
        nargs=2,
        type=int,
        metavar=("HEIGHT", "WIDTH"),
        help=f"synthetic image size (default {IMAGE_SIZE[0]} {IMAGE_SIZE[1]}; smoke {SMOKE_EVAL_IMAGE[0]} {SMOKE_EVAL_IMAGE[1]})",
    )
    parser.add_argument("--images", type=int, help=f"timed images (default {IMAGES}; smoke {SMOKE_IMAGES})")
    parser.add_argument(
        "--warmup-images",
        type=int,
        help=f"warm-up images, >= 1 (default {WARMUP_IMAGES}; smoke {SMOKE_WARMUP_IMAGES})",
    )
    parser.add_argument(
        "--batch-windows", type=int, help="windows per forward (default: InferenceSettings', 4)"
    )
    parser.add_argument(
        "--deform-backend",
        choices=["auto", "pytorch", "triton"],
        default="auto",
        help="cuda_ops.ms_deform_attn backend of the model (default auto)",
    )
    parser.add_argument("--tf32", action="store_true", help="allow TF32 matmuls (off by default)")
    parser.add_argument("--out", type=Path, help="results JSON (default: results_<device>.json here)")
    args = parser.parse_args()

    if args.cpu_smoke:
        device = torch.device("cpu")
        # one thread: OpenMP threads spin-waiting for a busy shared core make a smoke run 10x slower
        torch.set_num_threads(1)
        default_size, default_images, default_warmup = SMOKE_EVAL_IMAGE, SMOKE_IMAGES, SMOKE_WARMUP_IMAGES
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device: run on a GPU, or pass --cpu-smoke")
        device = torch.device("cuda")
        default_size, default_images, default_warmup = IMAGE_SIZE, IMAGES, WARMUP_IMAGES
    image_size = (args.image_size[0], args.image_size[1]) if args.image_size else default_size
    images = default_images if args.images is None else args.images
    warmup_images = default_warmup if args.warmup_images is None else args.warmup_images
    if images < 1 or warmup_images < 1:
        parser.error(
            "--images and --warmup-images must be >= 1 (the first warm-up image records the backend)"
        )
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
            modes=args.modes,
            precisions=args.precisions,
            image_size=image_size,
            images=images,
            warmup_images=warmup_images,
            batch_windows=args.batch_windows,
            deform_backend=args.deform_backend,
        )
    meta["timing"] = (
        f"{warmup_images} warm-up images, then {images} timed images through evaluate() between "
        "synchronisations; images/s = images / elapsed (test transform on the host, inference, "
        "probabilities to the host, argmax and metric update included)"
    )
    meta["inputs"] = f"synthetic uint8 noise images of {image_size[0]}x{image_size[1]} (height x width)"
    meta["ms_deform_attn_backends"] = backends_used(rows)
    meta["process_max_rss_MiB"] = process_max_rss_mib()
    results = {
        "meta": meta,
        "rows": rows,
        "targets": [{"target": "none: issue 7 sets no evaluation-throughput target", "met": None}],
    }
    out = args.out or default_out(HERE, device, args.cpu_smoke)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
