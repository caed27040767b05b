"""The ``vitadapter`` command line.

Each sub-command lives in its own module under :mod:`pipelines.commands` and exposes
``register(subparsers)``. Heavy imports (torch, timm, webdataset, ...) happen inside the command
functions, so ``vitadapter --help`` and ``vitadapter configs list`` stay fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

COMMAND_MODULES: tuple[str, ...] = (
    "pipelines.commands.configs",
    "pipelines.commands.checkpoint",
    "pipelines.commands.data",
    "pipelines.commands.train",
    "pipelines.commands.evaluate",
    "pipelines.commands.pipeline",
    "pipelines.commands.flow",
)

log = logging.getLogger("vitadapter")


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every registered sub-command."""
    parser = argparse.ArgumentParser(
        prog="vitadapter",
        description=(
            "ViT-Adapter semantic segmentation: the published ADE20K / Pascal Context 59 / COCO-Stuff-164k "
            "models, their recipes and official checkpoints, as a reproducible pipeline."
        ),
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vitadapter`` console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2) if args.verbose else logging.INFO
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except BrokenPipeError:  # e.g. `vitadapter configs list --json | head`
        sys.stderr.close()
        return 0
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as err:
        log.debug("traceback", exc_info=True)  # -vv shows where it came from
        log.error("%s", err.args[0] if isinstance(err, KeyError) and err.args else err)
        return 1


if __name__ == "__main__":
    sys.exit(main())
