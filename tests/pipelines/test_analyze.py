"""``vitadapter analyze``: parameters per component, FLOPs (cross-checked from first principles) and latency."""

from __future__ import annotations

import json
import time

import pytest

import models
from pipelines.cli import main
from pipelines.runs.analysis import SAMPLING_FLOPS_PER_CHANNEL, analyze_entry

DEIT_BASE = "upernet_deit_adapter_base_512_160k_ade20k"
TINY = "upernet_deit_adapter_tiny_512_160k_ade20k"


def test_vit_b16_trunk_at_224_from_first_principles() -> None:
    """A ViT-B/16 trunk (DeiT-B: 12 blocks of width 768, MLP 4x, no cls token in the adapter) at 224 x 224.

    Multiply-adds per block over N = 14 x 14 tokens of width D: qkv 3ND^2, attention scores and their
    weighted sum 2N^2D, projection ND^2, MLP 8ND^2, so 12ND^2 + 2N^2D; the patch embedding is a 16 x 16
    convolution from 3 channels: N * D * 768. FlopCounterMode counts 2 FLOPs per multiply-add.
    """
    tokens, width, depth = (224 // 16) ** 2, 768, 12
    macs = depth * (12 * tokens * width**2 + 2 * tokens**2 * width) + tokens * width * 3 * 16 * 16
    assert macs == 17_470_881_792  # 17.5 GMACs: the usual "17.6 GFLOPs" of ViT-B/16 counts multiply-adds
    row = analyze_entry(DEIT_BASE, size=(224, 224))
    assert row["input_size"] == [224, 224]
    assert row["flops"]["trunk"] == 2 * macs
    # per block: qkv 3D^2 + 3D, proj D^2 + D, MLP 8D^2 + 5D, two LayerNorms 4D, two layer scales 2D;
    # the patch embedding 768D + D; the position embedding of the 224 checkpoint, 14 x 14 + 1 cls slots
    block = 12 * width**2 + 15 * width
    assert row["params"]["trunk"] == depth * block + 769 * width + 197 * width == 85_814_784
    assert sum(row["params"][k] for k in ("trunk", "adapter", "head")) == row["params"]["total"]
    assert row["params"]["total"] == models.count_parameters(models.get_config(DEIT_BASE))


def test_deformable_sampling_by_formula_and_latency() -> None:
    """The tiny model at 64 x 64: every injector queries the 4 x 4 ViT tokens over 3 levels, every extractor
    the 8x8 + 4x4 + 2x2 adapter tokens over 1 level (the last interaction has 2 extra extractors)."""
    config = models.get_config(TINY, preset="tiny")
    adapter = config.backbone.adapter
    value_dim = int(config.backbone.trunk.embed_dim * adapter.deform_ratio)
    per_point = SAMPLING_FLOPS_PER_CHANNEL * adapter.n_points * value_dim
    injectors = 4 * (4 * 4) * 3 * per_point
    extractors = (4 + 2) * (8 * 8 + 4 * 4 + 2 * 2) * 1 * per_point
    row = analyze_entry(TINY, models.zoo.resolved_overrides(TINY, {}, preset="tiny"), latency=True, runs=2)
    assert row["flops"]["deform_sampling"] == injectors + extractors
    assert row["flops"]["total"] == row["flops"]["dense"] + row["flops"]["deform_sampling"]
    assert row["flops"]["head"] > 0 and row["flops"]["adapter"] > 0
    timing = row["latency"]
    assert timing["backend"] == "pytorch" and timing["images_per_s"] > 0 and timing["latency_ms"] > 0


def test_json_lists_every_entry_with_the_configs_list_counts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["configs", "list", "--json"]) == 0
    listed = {row["name"]: row["num_params"] for row in json.loads(capsys.readouterr().out)}
    start = time.perf_counter()
    assert main(["analyze", "--json"]) == 0
    elapsed = time.perf_counter() - start
    rows = json.loads(capsys.readouterr().out)
    assert [row["name"] for row in rows] == models.list_configs()
    for row in rows:
        assert row["params"]["total"] == listed[row["name"]], row["name"]
        assert row["flops"]["dense"] > 1e11 and row["flops"]["deform_sampling"] > 0, row["name"]
        assert "latency" not in row
    assert elapsed < 120, f"analyze of {len(rows)} entries took {elapsed:.0f} s"


def test_table_and_bad_size(capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    assert main(["analyze", TINY, "--preset", "tiny"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["name", "input", "trunk"] and out[1].startswith(TINY)
    assert main(["analyze", "mask2former_beit_adapter_large_896_80k_ade20k", "--size", "64", "96"]) == 1
    assert "crop_size" in caplog.text or "img_size" in caplog.text
