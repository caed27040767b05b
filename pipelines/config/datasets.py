"""Datasets in use: the built-in ones and the users' dataset cards, made known to ``data`` and ``models`` alike.

``models`` and ``data`` never import each other, so a user's card (:mod:`data.cards`) reaches the zoo's checks
(:func:`models.config.register_dataset`) and the catalog (:func:`data.catalog.register_dataset`) through here,
wherever the pipeline meets it: the card file (params.yaml ``datasets.<name>: {source: card, card: PATH}``),
the ``index.json`` of its shards (``vitadapter train --data``, evaluation), a checkpoint or an export trained on
it (its dataset record). A zoo entry trained on a card keeps its architecture and recipe; the class-dependent
layers are sized by :func:`dataset_overrides` (``data.dataset`` and ``num_classes``), which every checkpoint
records with its other overrides, so evaluation, prediction, ONNX export and the MLflow model rebuild it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import models.config
from data.catalog import DatasetInfo, dataset_from_record, get_dataset, register_dataset

INDEX_FILE = "index.json"
# the overrides a dataset fixes on an entry; a user's own value for them is an error, not silently replaced
DATASET_PATHS = ("data.dataset", "num_classes")
NO_PUBLISHED_ROW = "no published row"


def use_dataset(info: DatasetInfo) -> DatasetInfo:
    """Make a user's card ``info`` known to the catalog and to the zoo's checks (a built-in one is known)."""
    if info.own:
        register_dataset(info)
        models.config.register_dataset(info.name, info.num_classes)
    return info


def use_record(record: Mapping[str, Any], *, source: str) -> DatasetInfo:
    """:func:`use_dataset` of a dataset record (:meth:`data.catalog.DatasetInfo.to_record`) read from ``source``."""
    return use_dataset(dataset_from_record(record, source=source))


def use_card_file(path: str | Path) -> DatasetInfo:
    """Load and check a dataset card file and put it in use.

    Raises:
        FileNotFoundError, data.cards.CardError: naming the file and the key.
    """
    from data.cards import load_card

    return use_dataset(load_card(path).info())


def shards_dataset(root: str | Path) -> DatasetInfo | None:
    """The dataset of a prepared shard folder (its card put in use); None when ``root`` has no ``index.json``."""
    index_file = Path(root) / INDEX_FILE
    if not index_file.is_file():
        return None
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{index_file}: not a readable prepared-dataset index ({err})") from err
    card = index.get("card") if isinstance(index, dict) else None
    if isinstance(card, dict) and isinstance(card.get("dataset"), dict):
        return use_record(card["dataset"], source=str(index_file))
    name = index.get("dataset") if isinstance(index, dict) else None
    return get_dataset(str(name)) if name is not None else None


def dataset_overrides(info: DatasetInfo) -> dict[str, Any]:
    """The overrides that retarget a zoo entry to ``info``: its name and its number of classes."""
    return {"data.dataset": info.name, "num_classes": info.num_classes}


def retarget(name: str, overrides: Mapping[str, Any], info: DatasetInfo | None) -> dict[str, Any]:
    """``overrides`` of zoo entry ``name`` with the dataset ``info`` (a user's card) added; unchanged for a
    built-in dataset or None.

    Raises:
        ValueError: the overrides set ``data.dataset`` or ``num_classes`` to other values than the card's.
    """
    merged = dict(overrides)
    if info is None or not info.own:
        return merged
    wanted = dataset_overrides(info)
    clash = [path for path in DATASET_PATHS if path in merged and merged[path] != wanted[path]]
    if clash:
        raise ValueError(
            f"{name}: the overrides set {clash[0]}={merged[clash[0]]!r}, but the data are the card {info.name} "
            f"({wanted[clash[0]]!r}): leave {', '.join(DATASET_PATHS)} to the card"
        )
    merged.update(wanted)
    models.get_config(name, merged)  # the cross-field checks, before anything runs
    return merged


def is_own_data(config: Any) -> bool:
    """Whether ``config`` (a :class:`models.config.SegmentorConfig`) is trained on a user's card."""
    return get_dataset(config.data.dataset).own


def has_published_row(config: Any) -> bool:
    """Whether ``config``'s published numbers apply: it is trained and evaluated on its entry's own dataset."""
    return config.data.dataset == models.get_config(config.name).data.dataset


def published_miou(config: Any, mode: str) -> float | None:
    """The published mIoU of ``config``'s row in ``mode``; None where none was published or its data are
    another dataset (a user's card: :data:`NO_PUBLISHED_ROW`)."""
    return config.published.miou(mode) if has_published_row(config) else None
