"""Import official ViT-Adapter checkpoints into the project's container, export back to the official layout.

The project's state-dict layout equals the official one, so conversion is a strict validation
against the zoo entry (every key used, every missing/unexpected/mis-shaped key named) plus the
container: a project checkpoint records the zoo entry and overrides; an official (mmseg) file is
``{"meta": ..., "state_dict": ...}``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

import models
from data.atomic import write_json_atomic
from models.checkpoint import CheckpointError, compare_state_dict, load_checkpoint_file, unwrap_state_dict
from pipelines.engine.checkpoints import save_checkpoint_file

log = logging.getLogger(__name__)

PROJECT_FORMAT = "vitadapter"
PROJECT_FORMAT_VERSION = 1


def _expected_layout(name: str, overrides: dict[str, Any]):
    """The model's state dict on the meta device (names and shapes only, no memory)."""
    config = models.get_config(name, overrides)
    with torch.device("meta"):
        model = models.build_segmentor(config)
    return config, model.state_dict()


def convert(
    name: str,
    src: Path,
    dst: Path,
    *,
    overrides: dict[str, Any],
    to: str,
    strict: bool = True,
    state: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Validate the weights in ``src`` against zoo entry ``name`` and write them to ``dst``.

    Args:
        name: zoo entry (:func:`pipelines.runs.inputs.recorded_entry` finds the one a checkpoint records).
        src: official, project or training checkpoint file (or a release ``.zip``).
        dst: output file, written atomically.
        overrides: zoo overrides the weights were trained with.
        to: ``"project"`` (import) or ``"official"`` (export).
        strict: refuse any missing/unexpected/mis-shaped key.
        state: the content of ``src`` when the caller has already read it.

    Returns:
        The key report (also written next to ``dst`` as ``<dst>.keys.json``).
    """
    config, expected = _expected_layout(name, overrides)
    raw = state if state is not None else load_checkpoint_file(src)
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
    write_json_atomic(Path(f"{dst}.keys.json"), report_dict)
    log.info("%s", report.summary())
    log.info("wrote %s", dst)
    return report_dict
