"""Options shared by the commands that build a model: preset, ``--set`` overrides, deformable-attention backend."""

from __future__ import annotations

import argparse
from typing import Any

SET_HELP = (
    "override a field of the zoo entry by dotted path, repeatable: --set backbone.trunk.embed_dim=64 "
    "--set data.eval.mode=whole (bare shorthands: embed_dim, depth, num_heads, img_size, crop_size, lr, "
    "max_iters, ...; see README 'Overrides')"
)


def add_model_options(parser: argparse.ArgumentParser, *, set_help: str = SET_HELP) -> None:
    """``--preset``, ``--set PATH=VALUE`` and ``--deform-attn-backend``."""
    from models.presets import PRESETS

    parser.add_argument(
        "--preset", choices=sorted(PRESETS), help="named overrides applied first (tiny: a CPU-sized model)"
    )
    parser.add_argument("--set", action="append", metavar="PATH=VALUE", help=set_help)
    parser.add_argument(
        "--deform-attn-backend",
        choices=("auto", "pytorch", "triton"),
        help="multi-scale deformable attention: auto (Triton on CUDA after its parity self-check, else "
        "PyTorch; the environment variable VITADAPTER_DEFORM_ATTN_BACKEND decides when set), pytorch (the "
        "reference) or triton",
    )


def model_overrides(args: argparse.Namespace, *, name: str | None = None) -> dict[str, Any]:
    """The preset, ``--set`` and backend options as one ``{full path: value}`` for zoo entry ``name``.

    Raises:
        ValueError: a bad ``--set`` item, an unknown or ambiguous path or a wrong value, naming it.
    """
    import models.zoo
    from pipelines.config.overrides import parse_set_options

    given = parse_set_options(args.set)
    if getattr(args, "deform_attn_backend", None):
        given["deform_attn_backend"] = args.deform_attn_backend
    overrides = models.zoo.resolved_overrides(name or args.name, given, preset=getattr(args, "preset", None))
    models.get_config(name or args.name, overrides)  # the cross-field checks, before anything runs
    return overrides


def add_tracking_options(parser: argparse.ArgumentParser) -> None:
    """``--tracking-uri``, ``--experiment`` and ``--no-tracking``: stand-alone runs go to MLflow as the
    pipeline's do."""
    parser.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db, the pipeline's store)",
    )
    parser.add_argument(
        "--experiment", default="vitadapter", help="MLflow experiment (default vitadapter, the pipeline's)"
    )
    parser.add_argument("--no-tracking", action="store_true", help="do not record the run in MLflow")


def tracker_from(args: argparse.Namespace) -> Any:
    """The MLflow tracker the tracking options ask for (None with ``--no-tracking``)."""
    from pipelines.orchestration.tracked import command_tracker

    return command_tracker(args.tracking_uri, args.experiment, enabled=not args.no_tracking)
