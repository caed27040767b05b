"""Parity with the reference implementation (docs/reference.md §G1): the fill rule, loaded through the
official-checkpoint converter, reproduces the reference's outputs within atol 1e-4."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import models
from models.checkpoint import export_official_state_dict, load_official_state_dict
from reference_data import fill_state_dict, fill_value, golden_input, load_golden, load_manifest

ATOL = 1e-4


def _check_fill(golden, manifest) -> None:
    """Our fill implementation equals the reference's on the recorded checksums."""
    shapes = manifest.shapes
    for key, check in golden.fill_checks.items():
        if tuple(check["shape"]) != shapes[key]:
            continue  # recorded for another img_size (BEiT relative-position tables)
        value = fill_value(key, shapes[key], manifest.norm_weight_keys)
        assert value.double().sum().item() == pytest.approx(check["sum"], abs=1e-6), key
        np.testing.assert_allclose(value.reshape(-1)[:4].numpy(), check["first4"], atol=1e-7, err_msg=key)


def _assert_close(golden, key: str, ours: torch.Tensor) -> None:
    expected = golden.arrays[key]
    got = golden.subsample(key, ours)
    assert got.shape == expected.shape, key
    diff = np.abs(got - expected).max()
    assert diff <= ATOL, f"{key}: max abs diff {diff:.3g} > {ATOL}"


@pytest.fixture(scope="module")
def upernet_tiny():
    golden = load_golden("upernet_deit_adapter_tiny_224")
    manifest = load_manifest("upernet_deit_adapter_tiny_512_160k_ade20k")
    model = models.create_segmentor("upernet_deit_adapter_tiny_512_160k_ade20k").eval()
    state = fill_state_dict(manifest, model.state_dict())
    report = load_official_state_dict(model, state)
    assert report.complete and len(report.loaded) == len(manifest.keys)
    return golden, manifest, model, state


def test_fill_rule_matches_reference_checksums(upernet_tiny) -> None:
    golden, manifest, _, _ = upernet_tiny
    _check_fill(golden, manifest)


def test_upernet_deit_tiny_golden(upernet_tiny) -> None:
    golden, _, model, _ = upernet_tiny
    x = golden_input(golden)
    with torch.no_grad():
        features = model.extract_features(x)
        decode = model.decode_head(features)
        aux = model.auxiliary_head(features)
        logits = model.predict(x)
    for i, feature in enumerate(features, start=1):
        _assert_close(golden, f"backbone.f{i}", feature)
    _assert_close(golden, "decode_head.logits", decode)
    _assert_close(golden, "auxiliary_head.logits", aux)
    _assert_close(golden, "segmentor.logits.sub8", logits[:, :, ::8, ::8])
    # per-pixel argmax agrees except where the reference's top-2 logits are within float noise
    agree = (logits.argmax(1).numpy() == golden.arrays["segmentor.logits.argmax"]).mean()
    assert agree > 0.999, agree


def test_export_round_trip_is_exact(upernet_tiny) -> None:
    _, manifest, model, state = upernet_tiny
    exported = export_official_state_dict(model)
    assert [(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in exported.items()] == [
        (k, s, d) for k, s, d in manifest.keys
    ]
    for key, value in state.items():
        assert torch.equal(exported[key], value), key


def test_beit_adapter_base_backbone_golden() -> None:
    golden = load_golden("beit_adapter_base_backbone_224")
    assert golden.backbone_overrides == {"img_size": 224}
    manifest = load_manifest("mask2former_beit_adapter_base_480_40k_pascal_context_59")
    config = models.get_config(
        "mask2former_beit_adapter_base_480_40k_pascal_context_59",
        {"crop_size": [224, 224], "data.eval.stride": [160, 160]},
    )
    backbone = models.ViTAdapter(config.backbone).eval()
    # the backbone part of the manifest, with the relative-position tables at img_size 224
    ours = backbone.state_dict()
    prefixed = {f"backbone.{k}": v for k, v in ours.items()}
    for key, shape, _ in manifest.keys:
        if key.startswith("backbone."):
            expected = tuple(prefixed[key].shape)
            if "relative_position" not in key:
                assert shape == expected, key
    backbone_manifest = type(manifest)(
        config=manifest.config,
        keys=[(k, tuple(prefixed[k].shape), d) for k, _, d in manifest.keys if k.startswith("backbone.")],
        norm_weight_keys=manifest.norm_weight_keys,
        non_parameter_keys=manifest.non_parameter_keys,
    )
    _check_fill(golden, backbone_manifest)
    state = fill_state_dict(backbone_manifest, prefixed)
    backbone.load_state_dict({k.removeprefix("backbone."): v for k, v in state.items()}, strict=True)

    cls_tokens: list[torch.Tensor] = []
    hooks = [
        interaction.register_forward_hook(lambda m, i, out: cls_tokens.append(out[2]))
        for interaction in backbone.interactions
    ]
    with torch.no_grad():
        features = backbone(golden_input(golden))
    for hook in hooks:
        hook.remove()
    for i, feature in enumerate(features, start=1):
        _assert_close(golden, f"backbone.f{i}", feature)
    _assert_close(golden, "backbone.interactions.0.cls", cls_tokens[0])
    _assert_close(golden, "backbone.interactions.3.cls", cls_tokens[3])
