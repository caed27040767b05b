"""``vitadapter run diff RUN_DIR``: how a run differs from the published row it names.

Argument parsing only: the diff is written by training (:mod:`pipelines.runs.recipe_diff`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def _diff(args: argparse.Namespace) -> int:
    from pipelines.runs.recipe_diff import RECIPE_DIFF_FILE, read_diff

    diff = read_diff(Path(args.run_dir))
    if diff is None:
        log.error(
            "%s holds no %s: not a run folder, or a run from before recipe diffs were recorded "
            "(train it again, or rerun its training command: it resumes and writes one)",
            args.run_dir,
            RECIPE_DIFF_FILE,
        )
        return 1
    if args.json:
        json.dump(diff.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(diff.text())
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run",
        help="inspect a training run folder",
        description="Inspect a training run folder (what training wrote under artifacts/runs/<run>).",
    )
    commands = parser.add_subparsers(dest="run_command", metavar="SUBCOMMAND", required=True)
    diff = commands.add_parser(
        "diff",
        help="every way the run differs from the published row it names (its recipe_diff.json)",
        description=(
            "Print the run's recipe diff: iterations, global batch, BatchNorm group, accumulation, processes, "
            "crop, precision/TF32, pretrained weights, dataset, config changes and preset against the published "
            "row; 'comparable' when there is none."
        ),
    )
    diff.add_argument("run_dir", metavar="RUN_DIR", help="the run folder (or its recipe_diff.json)")
    diff.add_argument("--json", action="store_true", help="print the diff as JSON")
    diff.set_defaults(func=_diff)
