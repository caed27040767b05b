"""Every zoo entry: exact parameter count and exact official state-dict layout (meta device).

The Mask2Former entries without a reference count or manifest (the two COCO-Stuff-164k stages and
the BEiTv2 ADE20K 160k config) are checked against their ADE20K siblings: the same layout, apart
from the class layer of the COCO-Stuff stages (171 + 1 instead of 150 + 1 outputs).
"""

from __future__ import annotations

import pytest
import torch

import models
from models.checkpoint import load_official_state_dict
from reference_data import load_manifest, manifest_names, reference_param_counts

UPERNET = models.list_configs(head="upernet")
MASK2FORMER = models.list_configs(head="mask2former")


def _meta_model(name: str):
    with torch.device("meta"):
        return models.create_segmentor(name)


@pytest.mark.parametrize("name", UPERNET)
def test_parameter_count_equals_reference(name: str) -> None:
    assert models.count_parameters(models.get_config(name)) == reference_param_counts()[name]


@pytest.mark.parametrize("name", UPERNET)
def test_state_dict_layout_equals_manifest(name: str) -> None:
    assert name in manifest_names()
    manifest = load_manifest(name)
    ours = [
        (k, tuple(v.shape), str(v.dtype).removeprefix("torch."))
        for k, v in _meta_model(name).state_dict().items()
    ]
    assert ours == [(k, s, d) for k, s, d in manifest.keys]
    parameters = {k for k, _ in _meta_model(name).named_parameters()}
    assert parameters == {k for k, _, _ in manifest.keys} - manifest.non_parameter_keys


def _layout(name: str) -> list[tuple[str, tuple[int, ...], str]]:
    return [
        (k, tuple(v.shape), str(v.dtype).removeprefix("torch."))
        for k, v in _meta_model(name).state_dict().items()
    ]


MASK2FORMER_WITH_REFERENCE = [n for n in MASK2FORMER if n in reference_param_counts()]
# entries with no reference count or manifest -> their ADE20K sibling that has both
MASK2FORMER_SIBLINGS = {
    "mask2former_beit_adapter_large_896_80k_cocostuff164k": "mask2former_beit_adapter_large_896_80k_ade20k",
    "mask2former_beitv2_adapter_large_896_80k_cocostuff164k": "mask2former_beitv2_adapter_large_896_80k_ade20k",
    "mask2former_beitv2_adapter_large_896_160k_ade20k": "mask2former_beitv2_adapter_large_896_80k_ade20k",
}
CLASS_LAYER = ("decode_head.cls_embed.weight", "decode_head.cls_embed.bias")


def test_every_mask2former_entry_is_covered() -> None:
    assert len(MASK2FORMER) == 8
    assert sorted(MASK2FORMER) == sorted([*MASK2FORMER_WITH_REFERENCE, *MASK2FORMER_SIBLINGS])
    assert set(MASK2FORMER_WITH_REFERENCE) <= set(manifest_names())


@pytest.mark.parametrize("name", MASK2FORMER_WITH_REFERENCE)
def test_mask2former_parameter_count_equals_reference(name: str) -> None:
    assert models.count_parameters(models.get_config(name)) == reference_param_counts()[name]
    assert models.get_config(name).published.reference_num_params == reference_param_counts()[name]


@pytest.mark.parametrize("name", MASK2FORMER_WITH_REFERENCE)
def test_mask2former_state_dict_layout_equals_manifest(name: str) -> None:
    manifest = load_manifest(name)
    assert _layout(name) == [(k, s, d) for k, s, d in manifest.keys]
    parameters = {k for k, _ in _meta_model(name).named_parameters()}
    assert parameters == {k for k, _, _ in manifest.keys} - manifest.non_parameter_keys
    assert not any(k.startswith(("decode_head.conv_seg", "auxiliary_head")) for k, _, _ in manifest.keys)


@pytest.mark.parametrize("name", MASK2FORMER_WITH_REFERENCE)
def test_mask2former_official_layout_loads_strictly(name: str) -> None:
    dtypes = {"float32": torch.float32, "int64": torch.int64}
    official = {k: torch.empty(s, dtype=dtypes[d], device="meta") for k, s, d in load_manifest(name).keys}
    report = load_official_state_dict(_meta_model(name), {"meta": {}, "state_dict": official})
    assert report.complete and len(report.loaded) == len(official)


@pytest.mark.parametrize("name", sorted(MASK2FORMER_SIBLINGS))
def test_mask2former_entries_without_reference_match_their_sibling(name: str) -> None:
    sibling = MASK2FORMER_SIBLINGS[name]
    ours, theirs = _layout(name), _layout(sibling)
    assert [k for k, _, _ in ours] == [k for k, _, _ in theirs]
    num_classes = models.get_config(name).num_classes
    feat = models.get_config(name).decode_head.feat_channels
    extra_rows = num_classes - models.get_config(sibling).num_classes
    for (key, shape, dtype), (_, sibling_shape, sibling_dtype) in zip(ours, theirs, strict=True):
        assert dtype == sibling_dtype, key
        if key in CLASS_LAYER:
            assert shape[0] == num_classes + 1, key
            assert shape[1:] == sibling_shape[1:], key
        else:
            assert shape == sibling_shape, key
    expected = reference_param_counts()[sibling] + extra_rows * (feat + 1)
    assert models.count_parameters(models.get_config(name)) == expected
    assert extra_rows == (21 if "cocostuff" in name else 0)
