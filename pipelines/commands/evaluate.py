"""``vitadapter evaluate`` and ``vitadapter predict``: the reference's SS/MS inference on a checkpoint."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def _evaluate(args: argparse.Namespace) -> int:
    from pipelines.engine.distributed import init_distributed
    from pipelines.engine.evaluator import InferenceSettings, evaluate, resolve_precision
    from pipelines.overrides import parse_set_options
    from pipelines.runs import class_names, eval_items, model_from_checkpoint, write_json
    from pipelines.specs import test_pipeline

    dist_info = init_distributed(args.device)
    overrides = parse_set_options(args.set) if args.set else None
    model, config, _ = model_from_checkpoint(args.name, args.checkpoint, overrides, device=dist_info.device)
    source = eval_items(
        config, args.data, rank=dist_info.rank, world_size=dist_info.world_size, limit=args.limit
    )
    precision = resolve_precision(config, args.precision, dist_info.device)
    settings = InferenceSettings.from_config(
        config, mode=args.inference, batch_windows=args.batch_windows, precision=precision
    )
    metrics = evaluate(
        model,
        source.items,
        test_pipeline(config, args.mode),
        settings,
        num_classes=config.num_classes,
        device=dist_info.device,
        class_names=class_names(config),
        total=source.total,
        progress=not args.no_progress and dist_info.is_main,
        distributed=dist_info.distributed,
    )
    if not dist_info.is_main:
        return 0
    published = config.published.miou_ss if args.mode == "ss" else config.published.miou_ms
    result = {
        "config": config.name,
        "checkpoint": str(args.checkpoint),
        "data": source.description,
        "mode": args.mode,
        "precision": precision,
        "published_miou": published,
        "delta_miou": None if published is None else metrics["mIoU"] - published,
        **metrics,
    }
    summary = {k: v for k, v in result.items() if k != "per_class"}
    json.dump(summary, sys.stdout, indent=2)
    sys.stdout.write("\n")
    if args.out:
        write_json(Path(args.out), result)
        log.info("wrote %s", args.out)
    return 0


def _predict(args: argparse.Namespace) -> int:
    import cv2
    import numpy as np
    import torch

    from pipelines.engine.evaluator import InferenceSettings, predict_probabilities
    from pipelines.overrides import parse_set_options
    from pipelines.runs import class_names, model_from_checkpoint, palette
    from pipelines.specs import test_pipeline
    from pipelines.visualize import overlay_with_legend

    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    overrides = parse_set_options(args.set) if args.set else None
    model, config, _ = model_from_checkpoint(args.name, args.checkpoint, overrides, device=device)
    pipeline = test_pipeline(config, args.mode)
    settings = InferenceSettings.from_config(config, mode=args.inference, batch_windows=args.batch_windows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names, colors = class_names(config), palette(config)
    for image_path in args.images:
        image = cv2.imread(str(image_path), cv2.IMREAD_COLOR)
        if image is None:
            raise ValueError(f"{image_path}: not a readable image")
        probs = predict_probabilities(
            model, image, pipeline, settings, num_classes=config.num_classes, device=device
        )
        pred = probs.argmax(dim=0).numpy().astype(np.uint8)
        stem = Path(image_path).stem
        cv2.imwrite(str(out / f"{stem}.png"), pred)
        cv2.imwrite(str(out / f"{stem}_overlay.png"), overlay_with_legend(image, pred, colors, names))
        log.info(
            "%s -> %s (classes %s)", image_path, out / f"{stem}.png", sorted(int(c) for c in np.unique(pred))
        )
    return 0


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="zoo entry (see 'vitadapter configs list')")
    parser.add_argument("--checkpoint", required=True, help="official, imported or training checkpoint")
    parser.add_argument(
        "--mode", choices=("ss", "ms"), default="ss", help="single-scale or multi-scale + flip"
    )
    parser.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="zoo override (default: the checkpoint's)"
    )
    parser.add_argument("--inference", choices=("slide", "whole"), help="default: the config's (slide)")
    parser.add_argument(
        "--batch-windows", type=int, default=4, help="sliding windows per forward (default 4)"
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")


def register(subparsers: argparse._SubParsersAction) -> None:
    evaluate = subparsers.add_parser(
        "evaluate",
        help="evaluate a checkpoint single- or multi-scale with the reference metrics",
        description=(
            "Evaluate as the published numbers were measured (sliding windows, the config's scales and flips, "
            "probabilities averaged, mIoU accumulated over the set). Prints the metrics as JSON; several GPUs: "
            "torchrun --nproc-per-node N -m pipelines.cli evaluate ..."
        ),
    )
    _common(evaluate)
    evaluate.add_argument(
        "--data", required=True, help="prepared shard folder or the official raw dataset folder"
    )
    evaluate.add_argument("--out", help="also write the metrics (with per-class IoU/Acc) to this JSON file")
    evaluate.add_argument(
        "--precision",
        choices=("recipe", "fp32", "bf16", "fp16"),
        default="recipe",
        help="recipe (default): as the reference measured it, fp16 autocast on CUDA for DeiT-T/S/B and "
        "AugReg-T/B, fp32 otherwise; or force fp32/bf16/fp16",
    )
    evaluate.add_argument("--limit", type=int, help="only the first N validation images")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")
    evaluate.set_defaults(func=_evaluate)
    predict = subparsers.add_parser(
        "predict",
        help="segment images: class-index PNGs and colour overlays with a legend",
        description="Per image: OUT/<stem>.png (train ids) and OUT/<stem>_overlay.png (colours and legend).",
    )
    _common(predict)
    predict.add_argument("--out", required=True, help="output folder")
    predict.add_argument("images", nargs="+", help="image files")
    predict.set_defaults(func=_predict)
