"""``vitadapter checkpoint``: import official ViT-Adapter checkpoints and export back to their layout.

The project's state-dict layout equals the official one, so conversion is a strict validation
against the zoo entry (every key used, every missing/unexpected/mis-shaped key named) plus the
container: a project checkpoint records the zoo entry and overrides; an official (mmseg) file is
``{"meta": ..., "state_dict": ...}``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.commands.common import add_model_options, model_overrides


def _run(args: argparse.Namespace, to: str) -> int:
    from pipelines.runs.conversion import convert

    convert(
        args.name,
        Path(args.src),
        Path(args.out),
        overrides=model_overrides(args),
        to=to,
        strict=not args.non_strict,
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "checkpoint",
        help="import official checkpoints / export to the official layout",
        description="Import official ViT-Adapter checkpoints and export back to their layout (strict key checks).",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for action, to, text in (
        ("import", "project", "read an official ViT-Adapter checkpoint (.pth, .pth.tar or release .zip)"),
        ("export", "official", "write a project or training checkpoint in the official mmseg layout"),
    ):
        sub = actions.add_parser(
            action, help=text, description=text + "; the key report goes to OUT.keys.json"
        )
        sub.add_argument("name", help="zoo entry the weights belong to (see 'vitadapter configs list')")
        sub.add_argument("src", help="input checkpoint file")
        sub.add_argument("--out", required=True, help="output checkpoint file (written atomically)")
        add_model_options(sub)
        sub.add_argument(
            "--non-strict",
            action="store_true",
            help="keep the matching keys and report the others instead of failing",
        )
        sub.set_defaults(func=lambda args, to=to: _run(args, to))
