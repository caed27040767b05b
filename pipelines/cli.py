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
    "pipelines.commands.run",
    "pipelines.commands.export",
    "pipelines.commands.analyze",
    "pipelines.commands.pipeline",
    "pipelines.commands.flow",
    "pipelines.commands.tracking",
)

log = logging.getLogger("vitadapter")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vitadapter")
    except PackageNotFoundError:  # run from a checkout that was not installed
        return "unknown (not installed)"


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
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="more logging: -v debug messages of the project, -vv of every library",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``parser.parse_args``, except that a command declaring ``set_defaults(stray_inputs=ATTR)`` (a list
    positional after an optional one, e.g. ``predict [NAME] FILE...``) also takes the files that follow its
    options: argparse fills positionals only from the first run of them (``NAME --out DIR FILE``)."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        target = getattr(args, "stray_inputs", None)
        if target is None or any(value.startswith("-") for value in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        getattr(args, target).extend(extra)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vitadapter`` console script; returns the process exit code."""
    parser = build_parser()
    args = parse_args(parser, argv)
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(
        level=logging.DEBUG if args.verbose > 1 else max(level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for package in ("pipelines", "models", "data", "cuda_ops", "vitadapter"):
        logging.getLogger(package).setLevel(level)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except BrokenPipeError:  # e.g. `vitadapter configs list --json | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as err:
        signum = getattr(err, "signum", None)
        if signum is not None:  # training stopped by a signal after writing a checkpoint
            log.warning("%s", err)
            return 128 + int(signum)
        log.debug("traceback", exc_info=True)  # -vv shows where it came from
        log.error("%s", err.args[0] if isinstance(err, KeyError) and err.args else err)
        return 1


if __name__ == "__main__":
    sys.exit(main())
