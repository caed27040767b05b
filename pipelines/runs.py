"""Shared helpers of the run commands: models from checkpoints, datasets from folders, run folders."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import models
from data.catalog import get_dataset
from models.checkpoint import LoadReport, load_checkpoint_file, load_official_state_dict
from models.config import SegmentorConfig

log = logging.getLogger(__name__)

DEFAULT_RUNS_DIR = Path("artifacts/runs")
INDEX_FILE = "index.json"


def model_from_checkpoint(
    name: str,
    checkpoint: str | Path,
    overrides: dict[str, Any] | None = None,
    *,
    device: torch.device | None = None,
) -> tuple[nn.Module, SegmentorConfig, LoadReport]:
    """Build zoo entry ``name`` and load a checkpoint (official, imported or training) strictly.

    The zoo overrides a checkpoint was written with (imported and training checkpoints record them)
    are used unless ``overrides`` is given.
    """
    state = load_checkpoint_file(checkpoint)
    if overrides is None:
        overrides = state.get("overrides") or {}
    recorded = state.get("config")
    if isinstance(recorded, str) and recorded != models.get_config(name).name:
        raise ValueError(f"{checkpoint} holds weights of {recorded!r}, not {name!r}")
    config = models.get_config(name, **overrides)
    model = models.build_segmentor(config)
    report = load_official_state_dict(model, state, source=str(checkpoint))
    if device is not None:
        model = model.to(device)
    return model.eval(), config, report


@dataclass
class EvalSource:
    """Validation items of a prepared shard folder or of an official raw folder."""

    items: Iterator[dict[str, Any]]
    total: int
    description: str


def eval_items(
    config: SegmentorConfig, data: str | Path, *, rank: int = 0, world_size: int = 1, limit: int | None = None
) -> EvalSource:
    """This rank's share of the validation set of ``config``'s dataset, from shards or a raw folder.

    Each item is ``{"key", "image": (H, W, 3) uint8 BGR, "label": (H, W) train ids}`` at original size.
    """
    root = Path(data)
    dataset = config.data.dataset
    if (root / INDEX_FILE).is_file():
        from data.loaders import build_eval_loader

        loader = build_eval_loader(root, split="val", rank=rank, world_size=world_size)
        total = len(loader.dataset)
        items: Iterator[dict[str, Any]] = iter(loader)
        description = f"prepared shards {root}"
    else:
        from data.readers import find_samples, load_sample

        samples = find_samples(dataset, root, "val")[rank::world_size]
        total = len(samples)

        def generate() -> Iterator[dict[str, Any]]:
            for sample in samples:
                loaded = load_sample(sample)
                yield {"key": sample.key, "image": loaded.image, "label": loaded.label}

        items = generate()
        description = f"official {dataset} folder {root}"
    if limit is not None:
        total = min(total, limit)
        items = (item for i, item in zip(range(limit), items, strict=False))
    return EvalSource(items=items, total=total, description=description)


def class_names(config: SegmentorConfig) -> tuple[str, ...]:
    info = get_dataset(config.data.dataset)
    if info.num_classes != config.num_classes:
        return tuple(str(i) for i in range(config.num_classes))
    return tuple(info.class_names)


def palette(config: SegmentorConfig) -> np.ndarray:
    """(K, 3) uint8 RGB colours of the classes."""
    from data.catalog import make_palette

    return make_palette(config.num_classes)


def write_json(path: Path, payload: Any) -> Path:
    """Atomic JSON write (temporary file, then rename)."""
    from pipelines.engine.checkpoints import write_json_atomic

    write_json_atomic(path, payload)
    return path


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())
