"""``vitadapter configs``: list and show the zoo entries."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pipelines.commands.common import add_model_options, model_overrides

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
    "extension",
)


def config_rows(
    *, head: str | None = None, dataset: str | None = None, extensions: bool = False
) -> list[dict[str, Any]]:
    """One row per zoo entry (the extension entries too with ``extensions``); ``num_params`` counted on the meta device."""
    import models
    from models.param_counts import parameter_count

    rows = []
    for name in models.list_configs(head=head, dataset=dataset, extensions=extensions):
        config = models.get_config(name)
        num_params = parameter_count(config)
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
                "extension": config.published.extension,
            }
        )
    return rows


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _list(args: argparse.Namespace) -> int:
    rows = config_rows(head=args.head, dataset=args.dataset, extensions=not args.published_only)
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
            "extension" if r["extension"] else f"{_fmt(r['miou_ss'])} / {_fmt(r['miou_ms'])}",
            "-" if r["params_published_m"] is None else f"{r['params_published_m']}M",
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
    if any(r["extension"] for r in rows):
        sys.stdout.write(
            "('extension' rows: ViT-Adapter on newer trunks, beyond the published tables; nothing to compare with)\n"
        )
    return 0


def _show(args: argparse.Namespace) -> int:
    import models

    config = models.get_config(args.name, model_overrides(args))
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
            "the meta device (no memory)."
        ),
    )
    listing.add_argument(
        "--json", action="store_true", help=f"print JSON objects with fields {', '.join(JSON_FIELDS)}"
    )
    listing.add_argument("--head", choices=("upernet", "mask2former"), help="only this head")
    listing.add_argument(
        "--dataset", choices=("ade20k", "coco_stuff164k", "pascal_context_59"), help="only this dataset"
    )
    listing.add_argument(
        "--published-only",
        action="store_true",
        help="only the published rows and their COCO-Stuff stages (without the DINOv3/DINOv2/EVA-02 extension entries)",
    )
    listing.set_defaults(func=_list)
    show = actions.add_parser("show", help="print one entry's full config and recipe as JSON")
    show.add_argument("name", help="zoo entry (see 'vitadapter configs list')")
    add_model_options(show)
    show.set_defaults(func=_show)
