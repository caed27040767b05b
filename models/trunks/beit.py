"""BEiT trunk blocks for BEiTAdapter (BEiT / BEiTv2 checkpoints), docs/reference.md §P2.

timm's BEiT block matches the reference block exactly (``base/beit.py``): qkv without bias plus
learned ``q_bias``/``v_bias`` (k bias fixed to zero), a per-block relative position bias table of
``(2*Wh-1)*(2*Ww-1) + 3`` rows (the three extra entries for cls->token, token->cls and cls->cls,
indexed as the reference does), added to the attention logits before softmax, layer scale
``gamma_1``/``gamma_2``, and an MLP without dropout between its two layers. The one difference
is that timm keeps ``relative_position_index`` out of the state dict; the reference checkpoints
carry it, so here it is made a persistent buffer again.
"""

from __future__ import annotations

from functools import partial

from torch import nn

from models._timm import BeitBlock

LAYER_NORM_EPS = 1e-6


def make_beit_block(
    *,
    dim: int,
    num_heads: int,
    mlp_ratio: float,
    drop_path: float,
    layer_scale_init: float,
    window: tuple[int, int],
) -> nn.Module:
    """A BEiT block whose relative position bias covers a ``window`` patch grid plus the cls token.

    Args:
        dim: token width C.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width relative to C.
        drop_path: stochastic-depth rate of this block.
        layer_scale_init: initial value of ``gamma_1``/``gamma_2`` (1e-6 in every BEiT config).
        window: (Wh, Ww) patch grid; inputs must be exactly ``Wh*16 x Ww*16``.

    Returns:
        A module mapping (B, 1 + Wh*Ww, C) tokens (cls first) to the same shape.
    """
    block = BeitBlock(
        dim=dim,
        num_heads=num_heads,
        qkv_bias=True,
        mlp_ratio=mlp_ratio,
        drop_path=drop_path,
        init_values=layer_scale_init,
        norm_layer=partial(nn.LayerNorm, eps=LAYER_NORM_EPS),
        window_size=window,
    )
    # the reference's state dict holds the (constructed) index: keep it in ours for an exact layout
    block.attn.register_buffer("relative_position_index", block.attn.relative_position_index, persistent=True)
    return block
