"""Mask2Former parity with the reference (docs/reference.md §G1): the fill rule, loaded through the
official-checkpoint converter, reproduces ``golden_mask2former_beit_adapter_base_pc59_480x480``: the
pixel-decoder outputs, every decoder stage's class and mask predictions, ``seg_mask`` and the segmentor
logits, with the tolerances of tests/models/test_parity.py (float64 within the recording's own floor plus
float64 rounding; float32 within float32's rounding spread).

The masked attention's ``sigmoid(mask logit) < 0.5`` is a branch point: where float32 puts a mask logit
within its rounding of 0, two correct implementations block different entries, and the later stages
move by far more than rounding (the recording's own floor jumps from 7e-7 at stage 2 to 6e-5 at stage 3
for this reason). So our float32 run takes exact arithmetic's masks (the float64 run's), and every entry
it would block differently is checked to be such a tie.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_parity import check_against_the_recording, check_argmax, spreads

import parity_runs
from reference_data import fill_value, load_golden, load_golden_info, load_manifest
from rounding import LAMBDA

GOLDEN = "mask2former_beit_adapter_base_pc59_480"


@pytest.fixture(scope="module")
def runs():
    """float64 (its masks recorded), float32 with those masks imposed, float32 free (its own masks)."""
    pins = parity_runs.AttentionMaskPins()
    exact = parity_runs.run(GOLDEN, torch.float64, pins=pins)
    exact_masks, exact_logits = list(pins.masks), list(pins.logits)
    pinned = parity_runs.run(GOLDEN, torch.float32, pins=pins, impose=True)
    free_pins = parity_runs.AttentionMaskPins()
    parity_runs.run(GOLDEN, torch.float32, pins=free_pins)
    return exact, pinned, (exact_masks, exact_logits), (free_pins.masks, free_pins.logits)


def test_fill_rule_matches_reference_checksums_of_the_head() -> None:
    golden = load_golden(GOLDEN)
    manifest = load_manifest(parity_runs.GOLDENS[GOLDEN])
    checked = 0
    floating = {k for k, _, dtype in manifest.keys if dtype.startswith("float")}
    for key, check in golden.fill_checks.items():
        if key not in floating:
            continue  # constructed values (relative_position_index), not filled
        value = fill_value(key, manifest.shapes[key], manifest.norm_weight_keys)
        assert value.double().sum().item() == pytest.approx(check["sum"], abs=1e-6), key
        np.testing.assert_allclose(value.reshape(-1)[:4].numpy(), check["first4"], atol=1e-7, err_msg=key)
        checked += key.startswith("decode_head.")
    assert checked > 50


def test_mask2former_golden(runs) -> None:
    exact, pinned, _, _ = runs
    assert len(parity_runs.stored(load_golden(GOLDEN), exact)) == 21
    check_against_the_recording(GOLDEN, exact, pinned, float32_constants=True)


def test_segmentor_argmax(runs) -> None:
    exact, pinned, _, _ = runs
    check_argmax(GOLDEN, exact, pinned)


def test_float32_blocks_another_entry_only_at_ties(runs) -> None:
    _, _, (exact_masks, exact_logits), (free_masks, free_logits) = runs
    bands = spreads(GOLDEN)["attention_mask_logits"]
    assert len(free_masks) == len(exact_masks) == len(bands)
    for stage, (ours, exact) in enumerate(zip(free_masks, exact_masks, strict=True)):
        differ = ours != exact
        band = LAMBDA * bands[stage]["element"]
        assert (exact_logits[stage][differ].abs() <= band).all(), stage
        assert ((free_logits[stage].double() - exact_logits[stage])[differ].abs() <= band).all(), stage


def test_attention_masks_match_the_reference_counts(runs) -> None:
    """Blocked entries per stage (before the all-blocked-row reset) equal the reference's, up to the
    entries the reference itself records as within float32 noise of the threshold."""
    _, _, (exact_masks, _), _ = runs
    stats = load_golden_info(GOLDEN)["mask2former_attn_masks"]
    heads = parity_runs.model_for(GOLDEN, torch.float32).decode_head.transformer_decoder.num_heads
    assert (
        len(exact_masks) == len(stats["true_count"]) - 1
    )  # the reference also made one after the last layer
    for stage, mask in enumerate(exact_masks):
        batch, queries, keys = mask.shape
        assert [batch * heads, queries, keys] == stats["shape"][stage]
        ours = int(mask.sum()) * heads
        slack = heads * stats["near_threshold_count_fp32"][stage]
        assert abs(ours - stats["true_count"][stage]) <= slack, (stage, ours, stats["true_count"][stage])
