"""What a run reads: models from checkpoints, validation images from shards or official folders, class names."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import models
from data.catalog import get_dataset, is_builtin
from models.checkpoint import LoadReport, load_checkpoint_file, load_official_state_dict
from models.config import SegmentorConfig
from pipelines.config.datasets import retarget, shards_dataset, use_record

log = logging.getLogger(__name__)

INDEX_FILE = "index.json"


def model_from_checkpoint(
    name: str | None,
    checkpoint: str | Path,
    overrides: dict[str, Any] | None = None,
    *,
    device: torch.device | None = None,
    backend: str | None = None,
    state: dict[str, Any] | None = None,
) -> tuple[nn.Module, SegmentorConfig, LoadReport]:
    """Build zoo entry ``name`` and load a checkpoint (official, imported or training) strictly.

    The zoo overrides a checkpoint was written with (imported and training checkpoints record them by
    full path) are used unless ``overrides`` is given. ``backend`` sets the deformable-attention backend.
    ``name`` None: the entry the checkpoint records (imported and training checkpoints store ``config``).
    ``state``: the checkpoint's content when the caller has already read it (``checkpoint`` still names it).

    Raises:
        ValueError: ``name`` is None and the checkpoint records no zoo entry, or it records another one
            (:func:`check_recorded_entry`).
    """
    if state is None:
        state = load_checkpoint_file(checkpoint)
    card = None
    if isinstance(state.get("dataset"), dict):  # trained on a user's card: its classes and palette
        card = use_record(state["dataset"], source=str(checkpoint))
    if name is None:
        name = recorded_entry(state, checkpoint)
    # the caller's overrides (on the classes the weights were trained on), else the checkpoint's own
    overrides = dict(state.get("overrides") or {}) if overrides is None else retarget(name, overrides, card)
    if backend is not None:
        overrides = {**overrides, "deform_attn_backend": backend}
    check_recorded_entry(state, checkpoint, name)
    config = models.get_config(name, overrides)
    model = models.build_segmentor(config)
    report = load_official_state_dict(model, state, source=str(checkpoint))
    if device is not None:
        model = model.to(device)
    return model.eval(), config, report


def _entry_in(state: dict[str, Any]) -> str | None:
    meta = state.get("meta")
    for value in (state.get("config"), meta.get("zoo_entry") if isinstance(meta, dict) else None):
        if isinstance(value, str) and value:
            return value
    return None


def recorded_entry(state: dict[str, Any], checkpoint: str | Path) -> str:
    """The zoo entry a loaded checkpoint records (``config``; official files keep it in ``meta.zoo_entry``).

    Raises:
        ValueError: it records none, naming the file.
    """
    entry = _entry_in(state)
    if entry is None:
        raise ValueError(f"{checkpoint} records no zoo entry: give the NAME of its zoo entry")
    return entry


def check_recorded_entry(state: dict[str, Any], checkpoint: str | Path, name: str) -> None:
    """Refuse a checkpoint that records another zoo entry than ``name`` (a file that records none passes).

    Raises:
        ValueError: naming the file, the entry it records and ``name``.
    """
    recorded = _entry_in(state)
    if recorded is not None and recorded != models.get_config(name).name:
        raise ValueError(
            f"{checkpoint} holds weights of zoo entry {recorded!r}, not {name!r}: give {recorded} as NAME, or "
            "leave NAME out (the file records its entry)"
        )


def check_shards_match(config: SegmentorConfig, root: str | Path) -> None:
    """Refuse prepared shards of another dataset than the zoo entry's (name, number and names of classes).

    Raises:
        ValueError: naming the folder's dataset and classes and the entry's.
    """
    from data.shards import DatasetIndex

    index_file = Path(root) / INDEX_FILE
    index = DatasetIndex.from_json(index_file.read_text(), source=str(index_file))
    shards_dataset(root)  # a card's shards: its classes in use
    expected = get_dataset(config.data.dataset)
    problems = []
    if index.dataset != config.data.dataset:
        problems.append(
            f"it holds {index.dataset!r}, the entry is trained and evaluated on {config.data.dataset!r}"
        )
    if index.num_classes != config.num_classes:
        problems.append(f"it has {index.num_classes} classes, the entry {config.num_classes}")
    elif list(index.class_names) != list(expected.class_names):
        differing = next(
            i for i, (a, b) in enumerate(zip(index.class_names, expected.class_names, strict=True)) if a != b
        )
        problems.append(
            f"class {differing} is {index.class_names[differing]!r} there, {expected.class_names[differing]!r} "
            f"in {config.data.dataset}"
        )
    if problems:
        hint = (
            f"train on them with `vitadapter train {config.name} --data {root}` (the card's classes)"
            if index.card is not None
            else f"prepare {config.data.dataset} with `vitadapter data prepare {config.data.dataset} ...`"
        )
        raise ValueError(f"{root} does not hold the data of {config.name}: {'; '.join(problems)} ({hint})")


@dataclass
class EvalSource:
    """Validation items of a prepared shard folder or of an official raw folder.

    Attributes:
        skipped: the corrupt samples left out so far (with ``skip_corrupt``; filled while ``items`` is read).
    """

    items: Iterator[dict[str, Any]]
    total: int
    description: str
    skipped: list[dict[str, Any]] = field(default_factory=list)


def eval_items(
    config: SegmentorConfig,
    data: str | Path,
    *,
    rank: int = 0,
    world_size: int = 1,
    limit: int | None = None,
    skip_corrupt: bool = False,
) -> EvalSource:
    """This rank's share of the validation set of ``config``'s dataset, from shards or a raw folder.

    Each item is ``{"key", "image": (H, W, 3) uint8 BGR, "label": (H, W) train ids}`` at original size. A corrupt
    shard sample is an error naming the shard and the key, or with ``skip_corrupt`` left out (listed in the
    source's ``skipped``). ``limit``: the first N images of the whole set (over all ranks together), of which
    this rank takes its share.
    """
    root = Path(data)
    dataset = config.data.dataset
    skipped: list[dict[str, Any]] = []
    if (root / INDEX_FILE).is_file():
        from data.loaders import build_eval_loader

        check_shards_match(config, root)
        loader = build_eval_loader(
            root, split="val", rank=rank, world_size=world_size, skip_corrupt=skip_corrupt
        )
        total = len(loader.dataset)
        items: Iterator[dict[str, Any]] = iter(loader)
        skipped = loader.skipped
        description = f"prepared shards {root}"
    else:
        if not is_builtin(dataset):
            raise ValueError(
                f"{root} has no {INDEX_FILE}: evaluate the dataset card {dataset!r} on its prepared shards "
                "(`vitadapter data prepare --card CARD --out DIR`)"
            )
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
        # the first ``limit`` images of the whole set: ranks share positions round-robin (rank, rank + world,
        # ...), so this rank's part of them is its first len(range(rank, limit, world)) items
        own = len(range(rank, limit, world_size))
        total = min(total, own)
        items = (item for _, item in zip(range(own), items, strict=False))
    return EvalSource(items=items, total=total, description=description, skipped=skipped)


def class_names(config: SegmentorConfig) -> tuple[str, ...]:
    """The class names of ``config``'s dataset (a user's card: its names), by train id."""
    info = get_dataset(config.data.dataset)
    if info.num_classes != config.num_classes:
        return tuple(str(i) for i in range(config.num_classes))
    return tuple(info.class_names)


def palette(config: SegmentorConfig) -> np.ndarray:
    """(K, 3) uint8 RGB colours of the classes (a user's card: its palette)."""
    from data.catalog import make_palette

    info = get_dataset(config.data.dataset)
    if info.num_classes != config.num_classes:
        return make_palette(config.num_classes)
    return info.palette


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_stem(key: str) -> str:
    """A file-name stem made from a sample key: one path component of letters, digits, ``.``, ``_``, ``-``."""
    stem = _UNSAFE.sub("_", key).strip("._") or "sample"
    return stem[:200]
