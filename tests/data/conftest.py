"""Shared fixtures: tiny synthetic twins of the three datasets and their prepared shards (built once)."""

from __future__ import annotations

from pathlib import Path

import pytest

from data.catalog import DATASET_NAMES
from data.prepare import PrepareReport, prepare_dataset
from data.synthetic import TwinReport, synthesize

TINY_TWIN = {"num_train": 6, "num_val": 5, "seed": 3, "min_size": 40, "max_size": 72, "num_classes_used": 6}
SAMPLES_PER_SHARD = 4


@pytest.fixture(scope="session")
def twins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TwinReport]:
    """One tiny twin per dataset (read-only: copy before altering)."""
    root = tmp_path_factory.mktemp("twins")
    return {name: synthesize(name, root / name, **TINY_TWIN) for name in DATASET_NAMES}


@pytest.fixture(scope="session")
def prepared(
    twins: dict[str, TwinReport], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, PrepareReport]:
    """The twins prepared into shards (read-only)."""
    root = tmp_path_factory.mktemp("prepared")
    return {
        name: prepare_dataset(name, twin.root, root / name, samples_per_shard=SAMPLES_PER_SHARD)
        for name, twin in twins.items()
    }


@pytest.fixture()
def ade_twin_copy(tmp_path: Path) -> Path:
    """A fresh, alterable ADE20K twin."""
    return synthesize("ade20k", tmp_path / "twin", **{**TINY_TWIN, "num_train": 4, "num_val": 2}).root
