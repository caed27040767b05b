"""``vitadapter checkpoint``: import official ViT-Adapter checkpoints and export back to their layout.

The project's state-dict layout equals the official one, so conversion is a strict validation
against the zoo entry (every key used, every missing/unexpected/mis-shaped key named) plus the
container: a project checkpoint records the zoo entry and overrides; an official (mmseg) file is
``{"meta": ..., "state_dict": ...}``. The zoo entry's name may be left out when the source records it
(:func:`pipelines.runs.inputs.recorded_entry`, as ``evaluate`` and ``predict`` resolve it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.commands.common import add_model_options, model_overrides


def _run(args: argparse.Namespace, to: str) -> int:
    import models
    from models.checkpoint import load_checkpoint_file
    from pipelines.runs.conversion import convert
    from pipelines.runs.inputs import check_recorded_entry, recorded_entry

    if len(args.files) not in (1, 2):
        raise ValueError(
            f"vitadapter checkpoint {args.action}: give [NAME] SRC, got {len(args.files)} positional "
            f"arguments: {' '.join(args.files) or '(none)'}"
        )
    name, src = (None, *args.files) if len(args.files) == 1 else args.files
    state = load_checkpoint_file(src)
    if name is None:  # the zoo entry the checkpoint records (an official file without one: name it)
        name = recorded_entry(state, src)
    overrides = model_overrides(args, name=name)  # checks NAME and --set
    check_recorded_entry(state, src, name)  # a file of another entry is never converted under this NAME
    if not (args.set or args.preset) and state.get("config") == models.get_config(name).name:
        # the overrides an imported or training checkpoint of this entry records, as evaluate uses them
        overrides = {**dict(state.get("overrides") or {}), **overrides}
    convert(
        name,
        Path(src),
        Path(args.out),
        overrides=overrides,
        to=to,
        strict=not args.non_strict,
        state=state,
    )
    return 0


NAME_HELP = (
    "zoo entry the weights belong to (see 'vitadapter configs list'); optional when SRC records it (imported, "
    "training and exported checkpoints do)"
)


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
            action,
            help=text,
            usage=f"vitadapter checkpoint {action} [-h] [NAME] SRC --out OUT [options]",
            description=(
                f"{text}; the key report goes to OUT.keys.json. One positional argument is SRC, two are NAME "
                "SRC. Without --preset/--set the zoo overrides SRC records are used."
            ),
        )
        sub.add_argument(
            "files", nargs="*", metavar="[NAME] SRC", help=f"NAME: {NAME_HELP}; SRC: input checkpoint file"
        )
        sub.add_argument("--out", required=True, help="output checkpoint file (written atomically)")
        add_model_options(sub)
        sub.add_argument(
            "--non-strict",
            action="store_true",
            help="keep the matching keys and report the others instead of failing",
        )
        sub.set_defaults(func=lambda args, to=to: _run(args, to), stray_inputs="files")
