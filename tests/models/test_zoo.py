"""The zoo: 16 entries named after the reference configs, their recipes and published numbers."""

from __future__ import annotations

import subprocess
import sys

import pytest

import models
from models.overrides import apply_overrides
from reference_data import reference_param_counts

# the published tables (docs/reference.md §S), row by row: name -> (head, dataset, crop, iters, SS, MS, #Param M)
SEED_ROWS = {
    "upernet_deit_adapter_tiny_512_160k_ade20k": ("upernet", "ade20k", 512, 160_000, 42.6, 43.6, 36),
    "upernet_deit_adapter_small_512_160k_ade20k": ("upernet", "ade20k", 512, 160_000, 46.2, 47.1, 58),
    "upernet_deit_adapter_base_512_160k_ade20k": ("upernet", "ade20k", 512, 160_000, 48.8, 49.7, 134),
    "upernet_augreg_adapter_tiny_512_160k_ade20k": ("upernet", "ade20k", 512, 160_000, 43.9, 44.8, 36),
    "upernet_augreg_adapter_base_512_160k_ade20k": ("upernet", "ade20k", 512, 160_000, 51.9, 52.5, 134),
    "upernet_augreg_adapter_large_512_160k_ade20k": ("upernet", "ade20k", 512, 160_000, 53.4, 54.4, 364),
    "upernet_beit_adapter_large_640_160k_ade20k": ("upernet", "ade20k", 640, 160_000, 58.0, 58.4, 451),
    "mask2former_beit_adapter_large_640_160k_ade20k": (
        "mask2former",
        "ade20k",
        640,
        160_000,
        58.3,
        59.0,
        568,
    ),
    "mask2former_beit_adapter_large_896_80k_ade20k": ("mask2former", "ade20k", 896, 80_000, 59.4, 60.5, 571),
    "mask2former_beitv2_adapter_large_896_160k_ade20k": (
        "mask2former",
        "ade20k",
        896,
        160_000,
        None,
        None,
        571,
    ),
    "mask2former_beitv2_adapter_large_896_80k_ade20k": (
        "mask2former",
        "ade20k",
        896,
        80_000,
        61.2,
        61.5,
        571,
    ),
    "mask2former_beit_adapter_base_480_40k_pascal_context_59": (
        "mask2former",
        "pascal_context_59",
        480,
        40_000,
        64.0,
        64.4,
        120,
    ),
    "upernet_beit_adapter_large_480_80k_pascal_context_59": (
        "upernet",
        "pascal_context_59",
        480,
        80_000,
        67.0,
        67.5,
        451,
    ),
    "mask2former_beit_adapter_large_480_40k_pascal_context_59": (
        "mask2former",
        "pascal_context_59",
        480,
        40_000,
        67.8,
        68.2,
        568,
    ),
}
COCO_STAGES = {
    "mask2former_beit_adapter_large_896_80k_cocostuff164k": "mask2former_beit_adapter_large_896_80k_ade20k",
    "mask2former_beitv2_adapter_large_896_80k_cocostuff164k": "mask2former_beitv2_adapter_large_896_80k_ade20k",
}


def test_zoo_has_every_row_and_both_coco_stages() -> None:
    names = models.list_configs()
    assert len(names) == 16
    assert set(names) == set(SEED_ROWS) | set(COCO_STAGES)


@pytest.mark.parametrize("name", sorted(SEED_ROWS))
def test_entry_matches_published_row(name: str) -> None:
    head, dataset, crop, iters, ss, ms, params = SEED_ROWS[name]
    config = models.get_config(name)
    assert (config.head, config.data.dataset, config.data.train.crop_size, config.schedule.max_iters) == (
        head,
        dataset,
        (crop, crop),
        iters,
    )
    assert (config.published.miou_ss, config.published.miou_ms, config.published.params_m) == (ss, ms, params)
    assert config.published.in_seed_table
    assert config.data.train.global_batch == 16
    counts = reference_param_counts()
    if name in counts:
        assert config.published.reference_num_params == counts[name]


def test_strategy_two_chain() -> None:
    for stage1, stage2 in COCO_STAGES.items():
        first, second = models.get_config(stage1), models.get_config(stage2)
        assert second.pretrained.init_from == stage1
        assert first.num_classes == 171 and second.num_classes == 150
        assert first.decode_head.num_queries == second.decode_head.num_queries == 200
        assert not first.published.in_seed_table


def test_recipe_details_from_recipes_yaml() -> None:
    tiny = models.get_config("upernet_deit_adapter_tiny_512_160k_ade20k")
    assert (tiny.optimizer.lr, tiny.optimizer.weight_decay, tiny.optimizer.layer_decay_rate) == (
        1.2e-4,
        0.01,
        0.95,
    )
    assert tiny.data.eval.fp16 and tiny.data.eval.ms.source == "aug_test"
    assert tiny.data.eval.ms.ratios == (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    augreg_b = models.get_config("upernet_augreg_adapter_base_512_160k_ade20k")
    assert augreg_b.optimizer.layer_decay_rate is None
    assert [k for k, _, _ in augreg_b.optimizer.custom_keys] == [
        "level_embed",
        "pos_embed",
        "bias",
        "head",
        "norm",
    ]
    assert augreg_b.data.mean == (127.5, 127.5, 127.5) and augreg_b.backbone.trunk.img_size == 384
    assert models.get_config("upernet_augreg_adapter_tiny_512_160k_ade20k").data.mean == (
        123.675,
        116.28,
        103.53,
    )
    beit_l = models.get_config("upernet_beit_adapter_large_640_160k_ade20k")
    assert beit_l.decode_head.channels == 1024 and beit_l.backbone.with_cp
    assert beit_l.data.eval.ms.resize == "setr" and beit_l.data.eval.stride == (426, 426)
    v2 = models.get_config("mask2former_beitv2_adapter_large_896_80k_ade20k")
    assert v2.data.eval.flip and not v2.data.eval.ms.pad_before_normalize
    v1 = models.get_config("mask2former_beit_adapter_large_896_80k_ade20k")
    assert v1.data.eval.ms.pad_before_normalize and v1.data.eval.ms.pad_short_side == 896
    pascal = models.get_config("upernet_beit_adapter_large_480_80k_pascal_context_59")
    assert pascal.data.train.img_scale == (520, 520) and pascal.data.eval.img_scale == (4096, 520)
    assert pascal.schedule.eval_interval == 8_000


def test_names_accept_ss_ms_suffix_and_reject_unknown() -> None:
    assert models.get_config("upernet_beit_adapter_large_640_160k_ade20k_ss").name.endswith("_ade20k")
    with pytest.raises(KeyError, match="unknown zoo entry 'nope'"):
        models.get_config("nope")


def test_overrides_derive_what_follows_depth() -> None:
    config = models.get_config("upernet_deit_adapter_base_512_160k_ade20k", depth=8)
    assert config.backbone.adapter.interaction_indexes == ((0, 1), (2, 3), (4, 5), (6, 7))
    assert config.optimizer.num_layers == 8  # the layer-wise decay follows the trunk depth
    assert (
        models.get_config("upernet_augreg_adapter_base_512_160k_ade20k", depth=8).optimizer.num_layers is None
    )
    sectioned = apply_overrides(config, {"decode_head": {"channels": 32}})
    assert sectioned.decode_head.channels == 32 and sectioned.auxiliary_head.channels == 256
    with pytest.raises(ValueError, match="expected int"):
        apply_overrides(config, depth="eight")
    with pytest.raises(ValueError, match="depth=6 cannot be split"):
        apply_overrides(config, depth=6)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        apply_overrides(config, embed_dim=100)


def test_zoo_imports_no_torch() -> None:
    code = "import sys, models; models.list_configs(); models.get_config('upernet_deit_adapter_tiny_512_160k_ade20k'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_stored_parameter_counts_equal_fresh_counts() -> None:
    """`vitadapter configs list` reads models/param_counts.py; regenerate it with tools/update_param_counts.py."""
    from models.param_counts import COUNTS, config_digest

    names = models.list_configs(extensions=True)
    assert sorted(COUNTS) == sorted(names)
    for name in names:
        config = models.get_config(name)
        assert COUNTS[name] == (config_digest(config), models.count_parameters(config)), name
