"""Parity with the reference implementation (docs/reference.md §G1): the fill rule, loaded through the
official-checkpoint converter, reproduces the reference's recorded outputs.

The tolerances follow from float32 rounding of each model's computation (tests/rounding.py), not from a
machine: our float64 outputs differ from the recorded float32 ones by at most the recording's own
float32-vs-float64 difference plus float64's rounding (``2 LAMBDA sigma 2^-29``), and our float32 outputs from
our float64 ones by at most ``LAMBDA sigma`` (``sigma``: float32's emulated rounding spread of the output,
stored in ``tests/fixtures/reference/golden_<name>.rounding.json`` by ``tools/rounding_bounds.py``). The
class argmax agrees except at pixels whose top-2 logits are within rounding of each other.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import models
import parity_runs
from models.checkpoint import export_official_state_dict, load_official_state_dict
from reference_data import FIXTURES, Golden, fill_state_dict, fill_value, load_golden, load_manifest
from rounding import LAMBDA, U32, U64

FLOAT64 = U64 / U32  # float64's rounding error relative to float32's


def _check_fill(golden: Golden, manifest) -> None:
    """Our fill implementation equals the reference's on the recorded checksums."""
    shapes = manifest.shapes
    floating = {key: dtype.startswith("float") for key, _, dtype in manifest.keys}
    for key, check in golden.fill_checks.items():
        if tuple(check["shape"]) != shapes[key]:
            continue  # recorded for another img_size (BEiT relative-position tables)
        if not floating.get(key, False):
            continue  # constructed values (relative_position_index), not filled
        value = fill_value(key, shapes[key], manifest.norm_weight_keys)
        assert value.double().sum().item() == pytest.approx(check["sum"], abs=1e-6), key
        np.testing.assert_allclose(value.reshape(-1)[:4].numpy(), check["first4"], atol=1e-7, err_msg=key)


def spreads(name: str) -> dict[str, dict]:
    return json.loads((FIXTURES / f"golden_{name}.rounding.json").read_text())


def check_against_the_recording(
    name: str, exact: dict, ours32: dict, *, float32_constants: bool = False
) -> None:
    """Every stored output: float64 within the recording's floor, float32 within float32 rounding.

    ``float32_constants``: both implementations build some constants in float32 whatever the model's dtype
    (Mask2Former: the sine positional encodings and the deformable encoder's reference points, as mmdet
    does), each with its own float32 rounding, so the two float64 runs differ by up to float32's rounding of
    those constants carried through: the float64 bound then adds the float32 spread (``2 LAMBDA sigma``, which
    bounds the effect of any subset of float32's roundings) instead of float64's.
    """
    golden, bounds = load_golden(name), spreads(name)["quantities"]
    exact_stored, ours_stored = parity_runs.stored(golden, exact), parity_runs.stored(golden, ours32)
    rounding = 1.0 if float32_constants else FLOAT64
    for key, reference in exact_stored.items():
        recorded = torch.from_numpy(golden.arrays[key]).double().reshape(-1)
        assert reference.shape == recorded.shape, key
        float64_bound = golden.stored[key]["float32_floor"] + 2 * LAMBDA * bounds[key]["element"] * rounding
        difference = (reference - recorded).abs().max().item()
        assert difference <= float64_bound, (
            f"{key}: float64 differs by {difference:.3g} > {float64_bound:.3g}"
        )
        error = (ours_stored[key] - reference).norm().item()
        float32_bound = LAMBDA * bounds[key]["norm"]
        assert error <= float32_bound, f"{key}: float32 differs by {error:.3g} > {float32_bound:.3g} (norm)"


def check_argmax(name: str, exact: dict, ours32: dict) -> None:
    """Class argmax: ours (float32) and the reference's agree with exact arithmetic's except at pixels whose
    top-2 logits are within twice float32's largest logit spread of each other."""
    golden = load_golden(name)
    logits = exact["segmentor.logits"]
    band = 2 * LAMBDA * spreads(name)["quantities"]["segmentor.logits.sub8"]["element"]
    top = logits.topk(2, dim=1).values
    ties = ((top[:, 0] - top[:, 1]) <= band).numpy()
    exact_argmax = logits.argmax(1).numpy()
    for label, argmax in (("ours", ours32["segmentor.logits"].argmax(1).numpy()), ("the recording's", None)):
        argmax = golden.arrays["segmentor.logits.argmax"] if argmax is None else argmax
        differ = argmax != exact_argmax
        assert not (differ & ~ties).any(), f"{label} argmax differs at {int((differ & ~ties).sum())} non-ties"


@pytest.fixture(scope="module")
def upernet_runs():
    name = "upernet_deit_adapter_tiny_224"
    return parity_runs.run(name, torch.float64), parity_runs.run(name, torch.float32)


def test_fill_rule_matches_reference_checksums() -> None:
    _check_fill(
        load_golden("upernet_deit_adapter_tiny_224"),
        load_manifest(parity_runs.GOLDENS["upernet_deit_adapter_tiny_224"]),
    )


def test_upernet_deit_tiny_golden(upernet_runs) -> None:
    check_against_the_recording("upernet_deit_adapter_tiny_224", *upernet_runs)


def test_upernet_deit_tiny_argmax(upernet_runs) -> None:
    check_argmax("upernet_deit_adapter_tiny_224", *upernet_runs)


def test_export_round_trip_is_exact() -> None:
    entry = parity_runs.GOLDENS["upernet_deit_adapter_tiny_224"]
    manifest = load_manifest(entry)
    model = models.create_segmentor(entry).eval()
    state = fill_state_dict(manifest, model.state_dict())
    report = load_official_state_dict(model, state)
    assert report.complete and len(report.loaded) == len(manifest.keys)
    exported = export_official_state_dict(model)
    assert [(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in exported.items()] == [
        (k, s, d) for k, s, d in manifest.keys
    ]
    for key, value in state.items():
        assert torch.equal(exported[key], value), key


def test_beit_adapter_base_backbone_golden() -> None:
    name = "beit_adapter_base_backbone_224"
    golden = load_golden(name)
    assert golden.backbone_overrides == {"img_size": 224}
    manifest = load_manifest(parity_runs.GOLDENS[name])
    backbone = parity_runs.model_for(name, torch.float32)
    prefixed = {f"backbone.{k}": tuple(v.shape) for k, v in backbone.state_dict().items()}
    for key, shape, _ in manifest.keys:  # the layout is the manifest's, but for the img_size-224 tables
        if key.startswith("backbone.") and "relative_position" not in key:
            assert shape == prefixed[key], key
    _check_fill(golden, manifest)
    check_against_the_recording(
        name, parity_runs.run(name, torch.float64), parity_runs.run(name, torch.float32)
    )
