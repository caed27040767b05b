"""``vitadapter train``: train a zoo entry with its reference recipe (resumable; torchrun for several GPUs).

Argument parsing only: the knobs' flags are generated from :class:`pipelines.config.knobs.TrainParams`,
the training is :func:`pipelines.runs.training.run_training`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipelines.commands.common import add_model_options, add_tracking_options, model_overrides, tracker_from
from pipelines.config.knobs import add_knob_flags
from pipelines.config.params import DEFAULT_PATHS

log = logging.getLogger(__name__)


def _train(args: argparse.Namespace) -> int:
    from pipelines.config.datasets import retarget, shards_dataset
    from pipelines.config.knobs import knobs_from_flags
    from pipelines.engine.trainer import TrainingInterruptedError
    from pipelines.orchestration.tracked import train_command_tracked
    from pipelines.runs.training import RunSpec

    runs_dir = Path(args.runs_dir)
    # a dataset card's shards: the entry with the card's classes (the class-dependent layers sized to it)
    dataset = shards_dataset(args.data)
    overrides = retarget(args.name, model_overrides(args), dataset)
    # a card's run gets a folder of its own: never resumed from (or mixed with) the entry's run on its dataset
    default_dir = runs_dir / (
        f"{args.name}-{dataset.name}" if dataset is not None and dataset.own else args.name
    )
    spec = RunSpec(
        name=args.name,
        data=Path(args.data),
        work_dir=Path(args.work_dir) if args.work_dir else default_dir,
        knobs=knobs_from_flags(args),
        overrides=overrides,
        init_from=args.init_from,
        weights_dir=Path(args.weights_dir),
        runs_dir=runs_dir,
        device=args.device,
        progress=not args.no_progress,
        preset=args.preset,
    )
    try:
        result = train_command_tracked(spec, tracker_from(args))
    except TrainingInterruptedError as err:
        log.warning("%s", err)
        return 128 + err.signum  # 143 (SIGTERM) or 130 (Ctrl-C): a checkpoint was written; rerun to resume
    best = "-" if result.best_miou is None else f"{result.best_miou:.2f}"
    print(f"trained {args.name} to {result.iterations} iterations in {spec.work_dir}; best mIoU {best}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a zoo entry with its reference recipe",
        description=(
            "Train a zoo entry with its recipe (optimizer, layer decay, schedule, global batch 16). Rerunning the "
            "same command resumes from the run folder's latest checkpoint. For several GPUs or nodes launch it "
            "with torchrun, e.g. `torchrun --nproc-per-node 8 -m pipelines.cli train NAME --data DIR`. The run is "
            "recorded in MLflow as the pipeline records its runs (run name: the run folder's name; --no-tracking "
            "to skip)."
        ),
    )
    parser.add_argument("name", help="zoo entry (see 'vitadapter configs list')")
    parser.add_argument(
        "--data",
        required=True,
        help="prepared shard folder of the entry's dataset, or of a dataset card ('vitadapter data prepare "
        "--card'): the entry is then built with the card's number of classes, the rest of its recipe unchanged",
    )
    add_model_options(parser)
    parser.add_argument(
        "--work-dir",
        help="run folder (default: RUNS_DIR/NAME; on a dataset card's shards RUNS_DIR/NAME-CARD)",
    )
    parser.add_argument(
        "--runs-dir", default=DEFAULT_PATHS.runs, help=f"folder of run folders (default {DEFAULT_PATHS.runs})"
    )
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda if available"
    )
    parser.add_argument(
        "--init-from",
        default="auto",
        help="strategy-2 stage checkpoint: auto (the stage's run or the released file), none, or a path: any "
        "project or official checkpoint of the same architecture (e.g. the ADE20K model, to fine-tune on your "
        "own data); its class-dependent layers start fresh when its classes differ (the key report names them), "
        "any other missing or mis-shaped key is an error",
    )
    parser.add_argument(
        "--weights-dir",
        default=DEFAULT_PATHS.weights,
        help=f"pretrained/released files (default {DEFAULT_PATHS.weights})",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_tracking_options(parser)
    add_knob_flags(parser)
    parser.set_defaults(func=_train)
