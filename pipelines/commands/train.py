"""``vitadapter train``: train a zoo entry with its reference recipe (resumable; torchrun for several GPUs)."""

from __future__ import annotations

import argparse
from pathlib import Path


def _train(args: argparse.Namespace) -> int:
    from pipelines.engine.trainer import TrainingInterruptedError, TrainSettings
    from pipelines.overrides import parse_set_options
    from pipelines.train import RunSpec, default_work_dir, run_training

    runs_dir = Path(args.runs_dir)
    settings = TrainSettings(
        work_dir=Path(args.work_dir) if args.work_dir else default_work_dir(args.name, runs_dir),
        max_iters=args.max_iters,
        batch_size=args.batch_size,
        global_batch=args.global_batch,
        precision=args.precision,
        eval_interval=args.eval_interval,
        checkpoint_interval=args.checkpoint_interval,
        log_interval=args.log_interval,
        keep_checkpoints=args.keep_checkpoints,
        seed=args.seed,
        deterministic=args.deterministic,
        progress=not args.no_progress,
    )
    spec = RunSpec(
        name=args.name,
        data=Path(args.data),
        settings=settings,
        overrides=parse_set_options(args.set),
        pretrained=args.pretrained,
        init_from=args.init_from,
        weights_dir=Path(args.weights_dir),
        runs_dir=runs_dir,
        device=args.device,
        num_workers=args.num_workers,
        eval_limit=args.eval_limit,
    )
    try:
        result = run_training(spec)
    except TrainingInterruptedError:
        return 143  # 128 + SIGTERM: a checkpoint was written; rerun the same command to resume
    best = "-" if result.best_miou is None else f"{result.best_miou:.2f}"
    print(f"trained {args.name} to {result.iterations} iterations in {settings.work_dir}; best mIoU {best}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a zoo entry with its reference recipe",
        description=(
            "Train a zoo entry with its recipe (optimizer, layer decay, schedule, global batch 16). Rerunning the "
            "same command resumes from the run folder's latest checkpoint. For several GPUs or nodes launch it "
            "with torchrun, e.g. `torchrun --nproc-per-node 8 -m pipelines.cli train NAME --data DIR`."
        ),
    )
    parser.add_argument("name", help="zoo entry (see 'vitadapter configs list')")
    parser.add_argument(
        "--data",
        required=True,
        help="prepared shard folder of the entry's dataset ('vitadapter data prepare')",
    )
    parser.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="zoo override (architecture/recipe), repeatable"
    )
    parser.add_argument("--work-dir", help="run folder (default: RUNS_DIR/NAME)")
    parser.add_argument(
        "--runs-dir", default="artifacts/runs", help="folder of run folders (default artifacts/runs)"
    )
    parser.add_argument(
        "--max-iters", type=int, help="iterations (default: the recipe's); the schedule spans them"
    )
    parser.add_argument(
        "--batch-size", type=int, help="images per process and step (default: the recipe's per-GPU batch)"
    )
    parser.add_argument(
        "--global-batch", type=int, help="images per optimizer step (default: the recipe's 16)"
    )
    parser.add_argument(
        "--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="default fp32, as the reference"
    )
    parser.add_argument(
        "--eval-interval", type=int, help="iterations between evaluations (default: the recipe's)"
    )
    parser.add_argument(
        "--checkpoint-interval", type=int, help="iterations between checkpoints (default 1000)"
    )
    parser.add_argument("--log-interval", type=int, help="iterations between log lines (default 50)")
    parser.add_argument(
        "--keep-checkpoints", type=int, default=1, help="iteration checkpoints kept (default 1)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the init, data order and augmentation (default 0)"
    )
    parser.add_argument(
        "--deterministic", action="store_true", help="deterministic algorithms (exact resume)"
    )
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda if available"
    )
    parser.add_argument(
        "--num-workers", type=int, default=2, help="data-loader processes per rank (default 2)"
    )
    parser.add_argument(
        "--pretrained",
        default="auto",
        help="auto (the recipe's file from --weights-dir, downloaded if possible), none, or a path",
    )
    parser.add_argument(
        "--init-from",
        default="auto",
        help="strategy-2 stage checkpoint: auto (the stage's run or the released file), none, or a path",
    )
    parser.add_argument(
        "--weights-dir",
        default="artifacts/pretrained",
        help="pretrained/released files (default artifacts/pretrained)",
    )
    parser.add_argument("--eval-limit", type=int, help="evaluate on the first N validation images only")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=_train)
