"""``vitadapter evaluate`` and ``vitadapter predict``: the reference's SS/MS inference on a checkpoint.

Argument parsing only: evaluation is :func:`pipelines.runs.evaluation.evaluate_model`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pipelines.commands.common import add_model_options, add_tracking_options, model_overrides, tracker_from

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
    from pipelines.runs.evaluation import evaluate_model, per_class_table
    from pipelines.runs.inputs import model_from_checkpoint
    from pipelines.runs.recipe_diff import recorded_training_diff

    _require_checkpoint(args)
    dist_info = init_distributed(args.device)
    if args.show_dir:
        _claim_show_dir(Path(args.show_dir), is_main=dist_info.is_main)
    overrides = _checkpoint_overrides(args)
    model, config, _ = model_from_checkpoint(
        args.name,
        args.checkpoint,
        overrides,
        device=dist_info.device,
        backend=args.deform_attn_backend,
    )
    show = None
    if args.show_dir:
        from pipelines.runs.show import ComparisonWriter

        show = ComparisonWriter(Path(args.show_dir), config)
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
        on_prediction=show,
        skip_corrupt=args.skip_corrupt,
    )
    if show is not None:
        log.info("wrote %d comparison images to %s", len(show.written), args.show_dir)
    if not dist_info.is_main:
        return 0
    summary = {"checkpoint": str(args.checkpoint), **result.summary()}
    if not getattr(args, "quiet", False):  # the table for a person on stderr; stdout stays the JSON alone
        table = per_class_table(result.per_class, miou=result.metrics["mIoU"], macc=result.metrics["mAcc"])
        sys.stderr.write(f"{table}\n")
        sys.stderr.flush()
    json.dump(summary, sys.stdout, indent=2)
    sys.stdout.write("\n")
    written = None
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
    from pipelines.orchestration.tracked import log_command_evaluation

    log_command_evaluation(
        tracker_from(args),
        checkpoint=Path(args.checkpoint),
        data=Path(args.data),
        config=config,
        overrides=overrides or {},
        summary=summary,
        per_class=result.per_class,
        confusion_files=written,
    )
    return 0


def _claim_show_dir(folder: Path, *, is_main: bool) -> None:
    """Check ``--show-dir`` on every rank, then create and mark it on rank 0, before the model loads.

    Raises:
        data.atomic.ForeignFolderError: a file, or a non-empty folder vitadapter did not write.
    """
    from data.atomic import check_claimable, claim_folder
    from pipelines.engine.distributed import barrier

    check_claimable(folder)
    barrier()  # every rank has looked before rank 0 writes the marker
    if is_main:
        claim_folder(folder, writer="vitadapter evaluate --show-dir")
    barrier()


def _predict(args: argparse.Namespace) -> int:
    import models
    from pipelines.runs.prediction import expand_inputs, predict_images

    inputs = list(args.images)
    if args.name is not None and args.name not in models.list_configs(extensions=True):
        inputs.insert(0, args.name)  # NAME left out: the first positional is already an input
        args.name = None
    if not inputs:
        raise ValueError("vitadapter predict: no image or video file given")
    if bool(args.onnx) == bool(args.checkpoint):
        raise ValueError("vitadapter predict: give either --checkpoint or --onnx")
    images = expand_inputs(inputs)  # every input checked before the model loads
    from data.atomic import claim_folder

    # a folder vitadapter did not write is never written into: its files of the same name would be replaced
    claim_folder(Path(args.out), writer="vitadapter predict")
    model, config = _onnx_model(args) if args.onnx else _torch_model(args)
    result = predict_images(
        model,
        config,
        images,
        Path(args.out),
        mode=args.mode,
        inference=args.inference,
        batch_windows=args.batch_windows,
    )
    if result.failed:
        log.error("%s", result.summary())
        return 1
    log.info("%s", result.summary())
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
            "probabilities averaged, mIoU accumulated over the set). Prints the metrics as JSON on stdout and "
            "a table of the per-class IoU and Acc on stderr (not with -q), and records the evaluation in MLflow "
            "(under the training run of the checkpoint's run folder; --no-tracking to skip); several GPUs: "
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
    evaluate.add_argument(
        "--limit",
        type=int,
        help="only the first N validation images (of the whole evaluation, also under torchrun)",
    )
    evaluate.add_argument(
        "--skip-corrupt",
        action="store_true",
        help="leave out shard samples that cannot be read or decoded (counted as skipped_samples and listed in "
        "the metrics record) instead of stopping with an error naming the shard and the key",
    )
    evaluate.add_argument(
        "--show-dir",
        metavar="DIR",
        help="also write DIR/<image key>.png per evaluated image: the image, the prediction overlay and the "
        "ground-truth overlay (ignored pixels black) side by side, with a legend; DIR is created, a non-empty "
        "DIR vitadapter did not write is refused; with torchrun each process writes the images it evaluates",
    )
    evaluate.add_argument(
        "--tf32",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="TF32 convolutions and matmuls on CUDA, as the reference ran (default on; no effect on CPU)",
    )
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_tracking_options(evaluate)
    evaluate.set_defaults(func=_evaluate)
    predict = subparsers.add_parser(
        "predict",
        help="segment images or videos: class-index PNGs, colour overlays with a legend, overlay videos",
        description=(
            "Per image: OUT/<stem>.png (train ids) and OUT/<stem>_overlay.png (colours and legend). Per video "
            "(.mp4, .avi, .mov, .mkv): OUT/<stem>_overlay.mp4, every frame segmented. Each FILE may be a file, a "
            "folder (its image and video files, not its sub-folders) or a quoted glob pattern ('photos/*.jpg', "
            "'**' recursive); all are checked before the model loads. An input that cannot be read or segmented "
            "is reported and skipped; at the end a summary names the failed inputs, and the exit status is 1 "
            "if any failed. With --onnx the network runs in onnxruntime (exports of 'vitadapter export onnx'), "
            "the sliding windows and scales around it as in PyTorch."
        ),
    )
    _common(predict)
    predict.add_argument(
        "--out",
        required=True,
        help="output folder (created; a non-empty folder vitadapter did not write is refused, so no file of yours is replaced)",
    )
    predict.add_argument(
        "--onnx",
        action="append",
        metavar="FILE",
        help="run ONNX exports instead of a checkpoint (repeatable: one export per window/image size)",
    )
    predict.add_argument(
        "images",
        nargs="*",
        metavar="FILE",
        help="image or video file, folder of them (not recursive), or quoted glob pattern; images: "
        ".jpg .jpeg .png .bmp .tif .tiff .webp, videos: .mp4 .avi .mov .mkv",
    )
    predict.set_defaults(func=_predict, stray_inputs="images")
