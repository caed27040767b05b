"""``vitadapter evaluate`` and ``vitadapter predict``: the reference's SS/MS inference on a checkpoint.

Argument parsing only: evaluation is :func:`pipelines.runs.evaluation.evaluate_model`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pipelines.commands.common import add_model_options, model_overrides

log = logging.getLogger(__name__)


def _checkpoint_overrides(args: argparse.Namespace) -> dict | None:
    """The overrides given on the command line (None: the checkpoint's own, with ``--deform-attn-backend``)."""
    if not args.set and not args.preset:
        return None
    if args.name is None:  # the zoo entry the checkpoint records decides what the paths mean
        from models.checkpoint import load_checkpoint_file
        from pipelines.runs.inputs import recorded_entry

        return model_overrides(
            args, name=recorded_entry(load_checkpoint_file(args.checkpoint), args.checkpoint)
        )
    return model_overrides(args)


def _require_checkpoint(args: argparse.Namespace) -> None:
    if not args.checkpoint:
        raise ValueError(f"vitadapter {args.command}: --checkpoint is required")


def _evaluate(args: argparse.Namespace) -> int:
    from data.atomic import write_json_atomic
    from pipelines.engine.distributed import init_distributed
    from pipelines.reporting.confusion import write_confusion
    from pipelines.runs.evaluation import evaluate_model
    from pipelines.runs.inputs import model_from_checkpoint
    from pipelines.runs.recipe_diff import recorded_training_diff

    _require_checkpoint(args)
    dist_info = init_distributed(args.device)
    model, config, _ = model_from_checkpoint(
        args.name,
        args.checkpoint,
        _checkpoint_overrides(args),
        device=dist_info.device,
        backend=args.deform_attn_backend,
    )
    result = evaluate_model(
        model,
        config,
        args.data,
        mode=args.mode,
        precision=args.precision,
        dist_info=dist_info,
        inference=args.inference,
        batch_windows=args.batch_windows,
        limit=args.limit,
        progress=not args.no_progress,
        tf32=args.tf32,
        training_diff=recorded_training_diff(args.checkpoint),
    )
    if not dist_info.is_main:
        return 0
    summary = {"checkpoint": str(args.checkpoint), **result.summary()}
    json.dump(summary, sys.stdout, indent=2)
    sys.stdout.write("\n")
    if args.out:
        write_json_atomic(Path(args.out), {**summary, "per_class": result.per_class})
        log.info("wrote %s", args.out)
        written = write_confusion(
            result.confusion,
            result.per_class["name"],
            Path(args.out).with_suffix(".confusion"),
            title=f"{result.config} ({result.mode})",
        )
        log.info("wrote the confusion matrix: %s", ", ".join(str(p) for p in written))
    return 0


def _predict(args: argparse.Namespace) -> int:
    import models
    from pipelines.runs.prediction import predict_images

    images = [Path(p) for p in args.images]
    if args.name is not None and args.name not in models.list_configs(extensions=True):
        images.insert(0, Path(args.name))  # NAME left out: the first positional is already a file
        args.name = None
    if not images:
        raise ValueError("vitadapter predict: no image or video file given")
    if bool(args.onnx) == bool(args.checkpoint):
        raise ValueError("vitadapter predict: give either --checkpoint or --onnx")
    model, config = _onnx_model(args) if args.onnx else _torch_model(args)
    predict_images(
        model,
        config,
        images,
        Path(args.out),
        mode=args.mode,
        inference=args.inference,
        batch_windows=args.batch_windows,
    )
    return 0


def _torch_model(args: argparse.Namespace) -> tuple:
    import torch

    from pipelines.runs.inputs import model_from_checkpoint

    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    model, config, _ = model_from_checkpoint(
        args.name,
        args.checkpoint,
        _checkpoint_overrides(args),
        device=device,
        backend=args.deform_attn_backend,
    )
    return model, config


def _onnx_model(args: argparse.Namespace) -> tuple:
    """The ONNX exports as the model (the host loop around them is the PyTorch path's), and their config."""
    from pipelines.engine.onnx_session import OnnxSegmentor

    if args.set or args.preset or args.deform_attn_backend:
        raise ValueError(
            "vitadapter predict --onnx: the export fixes the model; --set/--preset/--deform-attn-backend do not apply"
        )
    runner = OnnxSegmentor(args.onnx)
    if args.name is not None and args.name != runner.entry:
        raise ValueError(f"{args.onnx[0]} is an export of {runner.entry!r}, not {args.name!r}")
    return runner, runner.config()


NAME_HELP = (
    "zoo entry (see 'vitadapter configs list'); optional when the checkpoint records it (imported and "
    "training checkpoints do)"
)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", help=NAME_HELP)
    parser.add_argument("--checkpoint", help="official, imported or training checkpoint")
    parser.add_argument(
        "--mode", choices=("ss", "ms"), default="ss", help="single-scale or multi-scale + flip"
    )
    add_model_options(
        parser,
        set_help="override a field by dotted path, repeatable (default: the overrides the checkpoint records)",
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
    evaluate.add_argument(
        "--out",
        help="also write the metrics (with per-class IoU/Acc) to this JSON file, and the class confusion "
        "matrix beside it (metrics.json: metrics.confusion.csv and the heat map metrics.confusion.png)",
    )
    evaluate.add_argument(
        "--precision",
        choices=("recipe", "fp32", "bf16", "fp16"),
        default="recipe",
        help="recipe (default): as the reference measured it, fp16 autocast on CUDA for DeiT-T/S/B and "
        "AugReg-T/B, fp32 otherwise; or force fp32/bf16/fp16",
    )
    evaluate.add_argument("--limit", type=int, help="only the first N validation images")
    evaluate.add_argument(
        "--tf32",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="TF32 convolutions and matmuls on CUDA, as the reference ran (default on; no effect on CPU)",
    )
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")
    evaluate.set_defaults(func=_evaluate)
    predict = subparsers.add_parser(
        "predict",
        help="segment images or videos: class-index PNGs, colour overlays with a legend, overlay videos",
        description=(
            "Per image: OUT/<stem>.png (train ids) and OUT/<stem>_overlay.png (colours and legend). Per video "
            "(.mp4, .avi, .mov, .mkv): OUT/<stem>_overlay.mp4, every frame segmented. With --onnx the network "
            "runs in onnxruntime (exports of 'vitadapter export onnx'), the sliding windows and scales around it "
            "as in PyTorch."
        ),
    )
    _common(predict)
    predict.add_argument("--out", required=True, help="output folder")
    predict.add_argument(
        "--onnx",
        action="append",
        metavar="FILE",
        help="run ONNX exports instead of a checkpoint (repeatable: one export per window/image size)",
    )
    predict.add_argument("images", nargs="*", metavar="FILE", help="image or video files")
    predict.set_defaults(func=_predict, stray_inputs="images")
