"""``vitadapter analyze``: parameters per component, FLOPs and (on request) latency of zoo entries.

Argument parsing only: the counts are :func:`pipelines.runs.analysis.analyze_entry`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pipelines.commands.common import add_model_options, model_overrides


def _millions(value: int) -> str:
    return f"{value / 1e6:.2f}M"


def _giga(value: int) -> str:
    return f"{value / 1e9:.1f}"


def _table(rows: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    header = (
        "name",
        "input",
        "trunk",
        "adapter",
        "head",
        "params",
        "GFLOPs",
        "sampling",
        "ms",
        "img/s",
        "backend",
    )
    table = [header]
    for row in rows:
        params, flops, timing = row["params"], row["flops"], row.get("latency")
        table.append(
            (
                row["name"],
                "x".join(str(v) for v in row["input_size"]),
                _millions(params["trunk"]),
                _millions(params["adapter"]),
                _millions(params["head"]),
                _millions(params["total"]),
                _giga(flops["dense"]),
                _giga(flops["deform_sampling"]),
                f"{timing['latency_ms']:.1f}" if timing else "-",
                f"{timing['images_per_s']:.2f}" if timing else "-",
                timing["backend"] if timing else "-",
            )
        )
    return table


def _analyze(args: argparse.Namespace) -> int:
    import models
    from pipelines.runs.analysis import analyze_entry

    names = args.names or models.list_configs(extensions=args.extensions)
    rows = [
        analyze_entry(
            name,
            model_overrides(args, name=name),
            size=tuple(args.size) if args.size else None,
            latency=args.latency,
            batch=args.batch,
            runs=args.runs,
        )
        for name in names
    ]
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    table = _table(rows)
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        sys.stdout.write(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
        sys.stdout.write("\n")
    sys.stdout.write(
        "GFLOPs: dense operators of one forward (FlopCounterMode, 2 per multiply-add); sampling: the deformable "
        "attention's bilinear sampling, by formula (README 'Analyze')\n"
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "analyze",
        help="parameters per component (trunk, adapter, head), FLOPs and latency of zoo entries",
        description=(
            "Parameters per component and FLOPs of one forward at the evaluation crop (the sliding window), "
            "counted on the meta device (no memory; all entries in seconds). FLOPs: the dense operators by "
            "torch's FlopCounterMode (2 per multiply-add), the deformable attention's sampling by formula, "
            "shown separately. --latency also times the forward on this machine's device with random weights."
        ),
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help="zoo entries (default: every published one)")
    parser.add_argument(
        "--size",
        nargs=2,
        type=int,
        metavar=("H", "W"),
        help="input size instead of the evaluation crop (it becomes the crop: a BEiT trunk is built for it)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON rows")
    parser.add_argument("--extensions", action="store_true", help="with no NAME: the extension entries too")
    parser.add_argument(
        "--latency", action="store_true", help="also measure the latency on CUDA when present, else the CPU"
    )
    parser.add_argument("--batch", type=int, default=1, help="images per timed forward (default 1)")
    parser.add_argument("--runs", type=int, default=5, help="timed forwards after 2 warm-up ones (default 5)")
    add_model_options(parser)
    parser.set_defaults(func=_analyze)
