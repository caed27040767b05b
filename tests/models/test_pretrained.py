"""Pretrained trunk loading (docs/reference.md §R2.2): DeiT/AugReg by name, BEiT with relative-position resampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import models
from models.pretrained import geometric_ratio, load_pretrained_trunk, resize_relative_position_table


def _backbone(name: str, **overrides):
    torch.manual_seed(0)
    return models.ViTAdapter(models.get_config(name, **overrides).backbone)


def _deit_like_checkpoint(backbone) -> dict:
    """A checkpoint in the DeiT release layout (timm names, cls token, final norm and head)."""
    state = {
        k: torch.randn_like(v)
        for k, v in backbone.state_dict().items()
        if k.startswith(("patch_embed", "blocks", "pos_embed"))
    }
    state = {k: v for k, v in state.items() if not k.endswith(("gamma1", "gamma2"))}
    dim = backbone.out_channels
    state.update(
        {"cls_token": torch.randn(1, 1, dim), "norm.weight": torch.ones(dim), "norm.bias": torch.zeros(dim)}
    )
    state.update({"head.weight": torch.randn(1000, dim), "head.bias": torch.zeros(1000)})
    return {"model": state}


def test_deit_checkpoint_loads_trunk_and_leaves_the_adapter() -> None:
    backbone = _backbone("upernet_deit_adapter_tiny_512_160k_ade20k", depth=4)
    spm_before = backbone.spm.fc1.weight.clone()
    checkpoint = _deit_like_checkpoint(backbone)
    report, resized = load_pretrained_trunk(backbone, checkpoint, "vit", source="deit.pth")
    assert not resized and not report.unexpected and not report.mismatched
    assert "backbone" not in " ".join(report.loaded)
    torch.testing.assert_close(backbone.pos_embed, checkpoint["model"]["pos_embed"])
    torch.testing.assert_close(
        backbone.blocks[3].mlp.fc2.weight, checkpoint["model"]["blocks.3.mlp.fc2.weight"]
    )
    assert torch.equal(backbone.blocks[0].gamma1, torch.ones(192))
    assert "blocks.0.gamma1" in report.missing and "spm.fc1.weight" in report.missing
    torch.testing.assert_close(backbone.spm.fc1.weight, spm_before)


def test_vit_resolution_mismatch_is_an_error() -> None:
    backbone = _backbone(
        "upernet_augreg_adapter_base_512_160k_ade20k", depth=4, embed_dim=64, num_heads=2, deform_num_heads=2
    )
    checkpoint = _deit_like_checkpoint(backbone)
    checkpoint["model"]["pos_embed"] = torch.randn(1, 197, 64)  # a 224 checkpoint into a 384 model
    with pytest.raises(ValueError, match=r"pos_embed model \[1, 577, 64\] vs checkpoint \[1, 197, 64\]"):
        load_pretrained_trunk(backbone, checkpoint, "vit")


@pytest.mark.parametrize(("img_size", "q"), [(480, 1.12506), (640, 1.16850), (896, 1.21807)])
def test_geometric_ratio_matches_the_reference(img_size: int, q: float) -> None:
    assert geometric_ratio(13, (2 * img_size // 16 - 1) // 2) == pytest.approx(q, abs=1e-5)


def test_relative_position_resampling_geometry() -> None:
    """A table linear in the (geometric) source offsets resamples to the same plane at integer offsets."""
    src, dst, heads = 27, 59, 2
    q = geometric_ratio(src // 2, dst // 2)
    offsets = np.cumsum([q**i for i in range(src // 2)])
    coords = np.concatenate([-offsets[::-1], [0.0], offsets])
    ys, xs = np.meshgrid(coords, coords, indexing="ij")
    planes = np.stack([0.5 * xs + 2.0 * ys, -xs + 0.25 * ys], axis=-1).reshape(src * src, heads)
    cls_rows = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    table = torch.cat([torch.from_numpy(planes).float(), cls_rows])
    out = resize_relative_position_table(table, dst)
    assert out.shape == (dst * dst + 3, heads)
    torch.testing.assert_close(out[-3:], cls_rows)
    grid = np.arange(-(dst // 2), dst // 2 + 1, dtype=np.float64)
    gy, gx = np.meshgrid(grid, grid, indexing="ij")
    expected = np.stack([0.5 * gx + 2.0 * gy, -gx + 0.25 * gy], axis=-1).reshape(dst * dst, heads)
    np.testing.assert_allclose(out[:-3].numpy(), expected, atol=1e-3)


def test_beit_checkpoint_with_shared_table_is_resized_into_every_block() -> None:
    backbone = _backbone(
        "mask2former_beit_adapter_base_480_40k_pascal_context_59",
        depth=4,
        embed_dim=64,
        num_heads=2,
        deform_num_heads=2,
        crop_size=[96, 96],  # a BEiT trunk's img_size follows the crop
        **{"data.eval.stride": [64, 64]},
    )
    # BEiT 224 pretraining: 14 x 14 window -> 27*27 + 3 rows; a shared table and an encoder. prefix
    shared = torch.randn(27 * 27 + 3, 2)
    state = {"encoder.cls_token": torch.randn(1, 1, 64), "rel_pos_bias.relative_position_bias_table": shared}
    for key, value in backbone.state_dict().items():
        if key.startswith("blocks.") and "relative_position" not in key:
            state[f"encoder.{key}"] = torch.randn_like(value) if value.is_floating_point() else value
    state["encoder.blocks.0.attn.relative_position_index"] = torch.zeros(197, 197, dtype=torch.long)
    state["fc_norm.weight"] = torch.ones(64)
    index_before = backbone.blocks[0].attn.relative_position_index.clone()
    report, resized = load_pretrained_trunk(backbone, {"module": state}, "beit", source="beit.pth")
    assert resized == [f"blocks.{i}.attn.relative_position_bias_table" for i in range(4)]
    assert not report.unexpected and not report.mismatched
    expected = resize_relative_position_table(shared, 2 * 6 - 1)
    for block in backbone.blocks:
        torch.testing.assert_close(block.attn.relative_position_bias_table, expected)
    assert torch.equal(backbone.blocks[0].attn.relative_position_index, index_before)
    torch.testing.assert_close(backbone.cls_token, state["encoder.cls_token"])
