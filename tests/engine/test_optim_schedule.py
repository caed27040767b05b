"""Parameter groups and learning rates against the formulas of docs/reference.md §R2.3."""

from __future__ import annotations

import pytest
import torch

import models
from models.config import ScheduleRecipe
from pipelines.engine.optim import build_optimizer, layer_id_for, param_group_specs
from pipelines.engine.schedule import apply_lr, scheduled_lr

TINY = {
    "embed_dim": 64,
    "num_heads": 2,
    "deform_num_heads": 2,
    "conv_inplane": 16,
    "decode_head.channels": 32,
    "auxiliary_head.channels": 32,
}


def _specs(name: str, **overrides):
    with torch.device("meta"):
        model = models.create_segmentor(name, **TINY, **overrides)
    config = models.get_config(name, **TINY, **overrides)
    specs = param_group_specs(model.named_parameters(), config.optimizer)
    by_param = {p: s for s in specs for p in s.params}
    return config, specs, by_param


@pytest.mark.parametrize(
    ("param", "expected"),
    [
        ("backbone.pos_embed", 0),
        ("backbone.cls_token", 0),
        ("backbone.patch_embed.proj.weight", 0),
        ("decode_head.query_feat.weight", 0),
        ("decode_head.cls_embed.bias", 0),
        ("backbone.blocks.0.attn.qkv.weight", 1),
        ("backbone.blocks.11.mlp.fc2.bias", 12),
        ("backbone.level_embed", 13),
        ("backbone.spm.stem.0.weight", 13),
        ("backbone.interactions.3.extra_extractors.1.ffn.fc1.weight", 13),
        ("decode_head.pixel_decoder.input_convs.0.conv.weight", 13),
        ("decode_head.conv_seg.weight", 13),
        ("auxiliary_head.convs.0.conv.weight", 13),
    ],
)
def test_layer_ids(param: str, expected: int) -> None:
    assert layer_id_for(param, num_max_layer=14) == expected


def test_layer_decay_groups_deit_tiny() -> None:
    _, specs, by_param = _specs("upernet_deit_adapter_tiny_512_160k_ade20k")
    base, rate = 1.2e-4, 0.95
    assert by_param["backbone.pos_embed"].lr == pytest.approx(base * rate**13)  # 0.513342 * base
    assert by_param["backbone.pos_embed"].weight_decay == 0.01  # decayed: the exemption never matches
    assert by_param["backbone.blocks.0.attn.qkv.weight"].lr == pytest.approx(base * 0.54036, rel=1e-5)
    assert by_param["backbone.blocks.11.attn.qkv.weight"].lr == pytest.approx(base * 0.95)
    assert by_param["backbone.blocks.3.gamma1"].weight_decay == 0.0  # 1-D
    assert by_param["backbone.interactions.0.injector.gamma"].weight_decay == 0.0
    assert (
        by_param["backbone.level_embed"].weight_decay == 0.01 and by_param["backbone.level_embed"].lr == base
    )
    assert by_param["decode_head.conv_seg.bias"].weight_decay == 0.0
    assert by_param["decode_head.conv_seg.weight"].weight_decay == 0.01
    assert by_param["backbone.norm1.weight"].weight_decay == 0.0
    # every parameter is in exactly one group
    with torch.device("meta"):
        model = models.create_segmentor("upernet_deit_adapter_tiny_512_160k_ade20k", **TINY)
    assert sorted(by_param) == sorted(n for n, _ in model.named_parameters())
    assert sum(len(s.params) for s in specs) == len(by_param)


def test_layer_decay_large_beit() -> None:
    _, _, by_param = _specs(
        "upernet_beit_adapter_large_640_160k_ade20k", crop_size=[64, 64], **{"data.eval.stride": [48, 48]}
    )
    base = 2e-5
    assert by_param["backbone.cls_token"].lr == pytest.approx(base * 0.9**25)  # 0.0718
    assert by_param["backbone.blocks.0.attn.relative_position_bias_table"].lr == pytest.approx(base * 0.9**24)
    assert by_param["backbone.blocks.0.attn.relative_position_bias_table"].weight_decay == 0.05
    assert by_param["backbone.blocks.23.attn.q_bias"].weight_decay == 0.0
    assert by_param["backbone.blocks.23.attn.q_bias"].lr == pytest.approx(base * 0.9)


def test_augreg_base_custom_keys() -> None:
    _, _, by_param = _specs("upernet_augreg_adapter_base_512_160k_ade20k")
    base = 2e-5
    expect = {
        "backbone.level_embed": (base, 0.0),
        "backbone.pos_embed": (base, 0.0),
        "decode_head.conv_seg.bias": (base, 0.0),  # "bias" before "head"
        "decode_head.conv_seg.weight": (10 * base, 0.01),
        "decode_head.bottleneck.bn.weight": (10 * base, 0.01),  # "head" before "norm"
        "auxiliary_head.convs.0.conv.weight": (10 * base, 0.01),
        "backbone.norm1.weight": (base, 0.0),
        "backbone.interactions.0.injector.query_norm.weight": (base, 0.0),
        "backbone.blocks.0.gamma1": (base, 0.01),  # no key matches: decayed although 1-D
        "backbone.spm.stem.1.weight": (base, 0.01),
        "backbone.blocks.0.attn.qkv.weight": (base, 0.01),
    }
    for name, (lr, wd) in expect.items():
        assert (by_param[name].lr, by_param[name].weight_decay) == (pytest.approx(lr), wd), name


def test_schedule_formula() -> None:
    schedule = ScheduleRecipe(max_iters=160_000, eval_interval=16_000)
    g = 1e-4
    assert scheduled_lr(g, 0, schedule) == pytest.approx(g * 1e-6)
    t = 750
    poly = g * (1 - t / 160_000)
    assert scheduled_lr(g, t, schedule) == pytest.approx(poly * (1 - (1 - t / 1500) * (1 - 1e-6)))
    assert scheduled_lr(g, 1500, schedule) == pytest.approx(g * (1 - 1500 / 160_000))
    assert scheduled_lr(g, 80_000, schedule) == pytest.approx(g * 0.5)
    assert scheduled_lr(g, 160_000, schedule) == 0.0


def test_optimizer_groups_follow_the_schedule() -> None:
    torch.manual_seed(0)
    model = models.create_segmentor("upernet_deit_adapter_tiny_512_160k_ade20k", **TINY)
    config = models.get_config("upernet_deit_adapter_tiny_512_160k_ade20k")
    optimizer = build_optimizer(model, config.optimizer)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["betas"] == (0.9, 0.999) and optimizer.defaults["eps"] == 1e-8
    apply_lr(optimizer, 3000, config.schedule)
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(group["initial_lr"] * (1 - 3000 / 160_000))
