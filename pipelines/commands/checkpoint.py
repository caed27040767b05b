"""``vitadapter checkpoint``: import official ViT-Adapter checkpoints and export back to their layout.

The project's state-dict layout equals the official one, so conversion is a strict validation
against the zoo entry (every key used, every missing/unexpected/mis-shaped key named) plus the
container: a project checkpoint records the zoo entry and overrides; an official (mmseg) file is
``{"meta": ..., "state_dict": ...}``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PROJECT_FORMAT = "vitadapter"
PROJECT_FORMAT_VERSION = 1


def _expected_layout(name: str, overrides: dict[str, Any]):
    """The model's state dict on the meta device (names and shapes only, no memory)."""
    import torch

    import models

    config = models.get_config(name, **overrides)
    with torch.device("meta"):
        model = models.build_segmentor(config)
    return config, model.state_dict()


def convert(
    name: str, src: Path, dst: Path, *, overrides: dict[str, Any], to: str, strict: bool = True
) -> dict[str, Any]:
    """Validate the weights in ``src`` against zoo entry ``name`` and write them to ``dst``.

    Args:
        name: zoo entry.
        src: official, project or training checkpoint file (or a release ``.zip``).
        dst: output file, written atomically.
        overrides: zoo overrides the weights were trained with.
        to: ``"project"`` (import) or ``"official"`` (export).
        strict: refuse any missing/unexpected/mis-shaped key.

    Returns:
        The key report (also written next to ``dst`` as ``<dst>.keys.json``).
    """
    from models.checkpoint import (
        CheckpointError,
        compare_state_dict,
        load_checkpoint_file,
        save_checkpoint_file,
        unwrap_state_dict,
    )

    config, expected = _expected_layout(name, overrides)
    raw = load_checkpoint_file(src)
    tensors = unwrap_state_dict(raw)
    report = compare_state_dict(expected, tensors, source=str(src))
    if strict and not report.complete:
        raise CheckpointError(f"{src} does not match zoo entry {name}:\n{report.summary()}")
    ordered = {k: tensors[k].to(expected[k].dtype).contiguous() for k in report.loaded}
    if to == "project":
        payload: dict[str, Any] = {
            "format": PROJECT_FORMAT,
            "version": PROJECT_FORMAT_VERSION,
            "config": config.name,
            "overrides": overrides,
            "source": str(src),
            "state_dict": ordered,
        }
    elif to == "official":
        payload = {
            "meta": {
                "config": config.reference_config,
                "exported_by": PROJECT_FORMAT,
                "zoo_entry": config.name,
            },
            "state_dict": ordered,
        }
    else:
        raise ValueError(f"unknown target format {to!r}")
    save_checkpoint_file(payload, dst)
    report_dict = report.to_dict()
    Path(f"{dst}.keys.json").write_text(json.dumps(report_dict, indent=1) + "\n")
    log.info("%s", report.summary())
    log.info("wrote %s", dst)
    return report_dict


def _run(args: argparse.Namespace, to: str) -> int:
    from pipelines.overrides import parse_set_options

    convert(
        args.name,
        Path(args.src),
        Path(args.out),
        overrides=parse_set_options(args.set),
        to=to,
        strict=not args.non_strict,
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "checkpoint",
        help="import official checkpoints / export to the official layout",
        description=__doc__.splitlines()[0] if __doc__ else None,
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
        sub.add_argument(
            "--set", action="append", metavar="KEY=VALUE", help="zoo override of the model (repeatable)"
        )
        sub.add_argument(
            "--non-strict",
            action="store_true",
            help="keep the matching keys and report the others instead of failing",
        )
        sub.set_defaults(func=lambda args, to=to: _run(args, to))
