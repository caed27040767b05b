"""The stored rounding spreads are the computation's, not one draw's: other seeds give the same (``slow``).

``tools/rounding_bounds.py`` stores float32's emulated rounding spread of every compared quantity
(tests/rounding.py). Recomputed here with seeds the stored files did not use, each tensor quantity's norm
spread agrees with the stored one within a factor of 2 (a norm over thousands of independent rounding
terms concentrates: its relative scatter between two runs is far below that), and the stored files were
made by this code for these fixtures (same unit roundoff and ``LAMBDA``).
"""

from __future__ import annotations

import json

import pytest

import parity_runs
import recorded_step
from reference_data import FIXTURES
from rounding import LAMBDA, U32

pytestmark = pytest.mark.slow

NEW_SEEDS = [1000, 1001]
FACTOR = 2.0
# scalars and tiny tensors (few rounding terms) scatter more between draws: compared by the t bound instead
MIN_ELEMENTS_FOR_FACTOR = 64


def _agree(stored: dict, fresh: dict, where: str) -> None:
    assert set(fresh) == set(stored), where
    for key, spread in fresh.items():
        old = stored[key]["norm"]
        if old == 0.0:
            assert spread["norm"] == 0.0, (where, key)
            continue
        ratio = spread["norm"] / old
        assert 1 / FACTOR <= ratio <= FACTOR or spread["elements"] < MIN_ELEMENTS_FOR_FACTOR, (
            where,
            key,
            ratio,
        )
        # whatever the size: a fresh draw never lands beyond the bound the tests use
        assert spread["norm"] <= LAMBDA * old, (where, key, ratio)


def test_train_step_spreads_are_reproduced_by_other_seeds() -> None:
    stored = json.loads((FIXTURES / f"train_step_{recorded_step.FIXTURE}.rounding.json").read_text())
    assert stored["unit_roundoff"] == U32 and stored["lambda"] == LAMBDA
    fresh = recorded_step.spreads(recorded_step.golden(), iter(NEW_SEEDS))
    _agree(stored["quantities"], fresh["quantities"], "train step")
    _agree(stored["gradient_norms"], fresh["gradient_norms"], "train step gradient norms")


@pytest.mark.parametrize("name", ["upernet_deit_adapter_tiny_224", "beit_adapter_base_backbone_224"])
def test_parity_spreads_are_reproduced_by_other_seeds(name: str) -> None:
    stored = json.loads((FIXTURES / f"golden_{name}.rounding.json").read_text())
    assert stored["unit_roundoff"] == U32 and stored["lambda"] == LAMBDA
    fresh = parity_runs.spreads(name, iter(NEW_SEEDS))
    _agree(stored["quantities"], fresh["quantities"], name)
