"""``vitadapter export onnx``: a checkpoint's whole-image inference as an ONNX graph.

Argument parsing only: the export is :func:`pipelines.runs.onnx_export.export_checkpoint`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipelines.commands.common import SET_HELP, model_overrides


def _overrides(args: argparse.Namespace) -> dict | None:
    """The ``--set``/``--preset`` overrides (None: the checkpoint's own)."""
    if not args.set and not args.preset:
        return None
    name = args.name
    if name is None:  # the paths are checked against the entry the checkpoint records
        from models.checkpoint import load_checkpoint_file
        from pipelines.runs.inputs import recorded_entry

        name = recorded_entry(load_checkpoint_file(args.checkpoint), args.checkpoint)
    return model_overrides(args, name=name)


def _onnx(args: argparse.Namespace) -> int:
    from pipelines.runs.onnx_export import ONNX_OPSET, export_checkpoint

    result = export_checkpoint(
        args.name,
        Path(args.checkpoint),
        Path(args.out),
        overrides=_overrides(args),
        size=tuple(args.size) if args.size else None,
        dynamic_batch=args.dynamic_batch,
        opset=args.opset or ONNX_OPSET,
    )
    json.dump(
        {
            "onnx": str(result.path),
            "input_size": list(result.size),
            "dynamic_batch": result.dynamic_batch,
            "opset": result.opset,
            **result.metadata,
        },
        sys.stdout,
        indent=2,
    )
    sys.stdout.write("\n")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from models.presets import PRESETS

    parser = subparsers.add_parser(
        "export",
        help="export a checkpoint for serving (ONNX)",
        description="Export a trained, imported or official checkpoint for inference outside PyTorch.",
    )
    formats = parser.add_subparsers(dest="format", metavar="FORMAT", required=True)
    onnx = formats.add_parser(
        "onnx",
        help="whole-image inference as ONNX: normalised image in, class scores at input resolution out",
        description=(
            "Export model.predict (a normalised (B, 3, H, W) image in, (B, K, H, W) class scores out: UperNet "
            "logits, Mask2Former semantic scores) at one input size, with the reference deformable attention "
            "(GridSample) and every spatial shape a constant. Sliding windows and multi-scale run around it: "
            "vitadapter predict --onnx FILE ... (one export per window/image size)."
        ),
    )
    onnx.add_argument(
        "name",
        nargs="?",
        help="zoo entry (optional when the checkpoint records it: imported and training checkpoints do)",
    )
    onnx.add_argument("--checkpoint", required=True, help="official, imported or training checkpoint")
    onnx.add_argument("--out", required=True, help="the .onnx file to write")
    onnx.add_argument(
        "--size",
        nargs=2,
        type=int,
        metavar=("H", "W"),
        help="input size (default: the evaluation crop, the sliding window); multiples of 32; a BEiT trunk "
        "takes only its img_size (its relative position tables fix it)",
    )
    onnx.add_argument(
        "--dynamic-batch", action="store_true", help="a free batch dimension (default: batch 1)"
    )
    onnx.add_argument("--opset", type=int, help="ONNX opset (default 18; GridSample needs 16 or newer)")
    onnx.add_argument(
        "--preset", choices=sorted(PRESETS), help="named overrides applied first (tiny: a CPU-sized model)"
    )
    onnx.add_argument(
        "--set",
        action="append",
        metavar="PATH=VALUE",
        help=f"{SET_HELP} (default: the overrides the checkpoint records)",
    )
    onnx.set_defaults(func=_onnx)
