"""``vitadapter configs``: list and show the zoo entries."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

JSON_FIELDS = (
    "name",
    "dataset",
    "head",
    "crop_size",
    "iters",
    "miou_ss",
    "miou_ms",
    "params_published_m",
    "num_params",
)


def config_rows(*, head: str | None = None, dataset: str | None = None) -> list[dict[str, Any]]:
    """One row per zoo entry; ``num_params`` counted on the meta device (None where the head is not built)."""
    import models
    from models.builder import HeadNotAvailableError

    rows = []
    for name in models.list_configs(head=head, dataset=dataset):
        config = models.get_config(name)
        try:
            num_params: int | None = models.count_parameters(config)
        except HeadNotAvailableError:
            num_params = None
        rows.append(
            {
                "name": name,
                "dataset": config.data.dataset,
                "head": config.head,
                "crop_size": config.data.train.crop_size[0],
                "iters": config.schedule.max_iters,
                "miou_ss": config.published.miou_ss,
                "miou_ms": config.published.miou_ms,
                "params_published_m": config.published.params_m,
                "num_params": num_params,
            }
        )
    return rows


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _list(args: argparse.Namespace) -> int:
    rows = config_rows(head=args.head, dataset=args.dataset)
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    header = ("name", "dataset", "head", "crop", "iters", "mIoU SS/MS", "#Param", "built")
    table = [
        (
            r["name"],
            r["dataset"],
            r["head"],
            str(r["crop_size"]),
            f"{r['iters'] // 1000}k",
            f"{_fmt(r['miou_ss'])} / {_fmt(r['miou_ms'])}",
            f"{r['params_published_m']}M",
            "-" if r["num_params"] is None else f"{r['num_params'] / 1e6:.2f}M",
        )
        for r in rows
    ]
    widths = [max(len(str(row[i])) for row in [header, *table]) for i in range(len(header))]
    for row in [header, *table]:
        sys.stdout.write(
            "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
        sys.stdout.write("\n")
    return 0


def _show(args: argparse.Namespace) -> int:
    import models
    from pipelines.overrides import parse_set_options

    config = models.get_config(args.name, **parse_set_options(args.set))
    json.dump(config.to_dict(), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "configs",
        help="list and show the zoo (one entry per reference config)",
        description="The model zoo: architecture, recipe and published numbers of every reference config.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser(
        "list",
        help="every zoo entry with dataset, head, crop, iterations, published mIoU and #Param",
        description=(
            "List the zoo. 'built' is the parameter count of the model this project builds, counted on "
            "the meta device (no memory); '-' where the head is not built yet."
        ),
    )
    listing.add_argument(
        "--json", action="store_true", help=f"print JSON objects with fields {', '.join(JSON_FIELDS)}"
    )
    listing.add_argument("--head", choices=("upernet", "mask2former"), help="only this head")
    listing.add_argument(
        "--dataset", choices=("ade20k", "coco_stuff164k", "pascal_context_59"), help="only this dataset"
    )
    listing.set_defaults(func=_list)
    show = actions.add_parser("show", help="print one entry's full config and recipe as JSON")
    show.add_argument("name", help="zoo entry (see 'vitadapter configs list')")
    show.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field (repeatable)")
    show.set_defaults(func=_show)
