"""The plain ViT trunk of ViTAdapter (DeiT / AugReg checkpoints), docs/reference.md §P1.

Follows the reference ``TIMMVisionTransformer`` (``base/vit.py``): timm's attention (qkv with bias)
and MLP (GELU, exact erf), LayerNorm eps 1e-6, and layer scale switched on by default: every
block owns ``gamma1``/``gamma2`` initialised to 1.0 (named without underscore, absent from the
DeiT/AugReg checkpoints). Global attention in every block (no window attention in any seed config).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models._timm import DropPath, Mlp, VitAttention

LAYER_NORM_EPS = 1e-6


class ViTBlock(nn.Module):
    """Pre-norm transformer block with layer scale: ``x + drop_path(gamma * f(norm(x)))``.

    Args:
        dim: token width C.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width relative to C.
        qkv_bias: bias of the fused qkv projection.
        drop_path: stochastic-depth rate of this block.
        layer_scale_init: initial value of ``gamma1`` and ``gamma2``.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        drop_path: float,
        layer_scale_init: float,
    ) -> None:
        super().__init__()
        self.gamma1 = nn.Parameter(torch.full((dim,), layer_scale_init))
        self.gamma2 = nn.Parameter(torch.full((dim,), layer_scale_init))
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = VitAttention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N, C)."""
        x = x + self.drop_path(self.gamma1 * self.attn(self.norm1(x)))
        return x + self.drop_path(self.gamma2 * self.mlp(self.norm2(x)))


def resize_pos_embed(pos_embed: torch.Tensor, pretrain_grid: int, height: int, width: int) -> torch.Tensor:
    """Drop the cls slot of a learned position embedding and resize it to the patch grid.

    The reference does this at every forward (not at load time): the pretrain-resolution grid is
    interpolated bicubically (``align_corners=False``) to the actual ``(H/16, W/16)`` grid.

    Args:
        pos_embed: (1, 1 + G*G, C) embedding including the cls slot, G = ``pretrain_grid``.
        pretrain_grid: G, the pretraining resolution divided by the patch size.
        height, width: the patch grid of the current input.

    Returns:
        (1, height*width, C).
    """
    channels = pos_embed.shape[-1]
    # (1, G*G, C) -> (1, G, G, C) -> (1, C, G, G)
    grid = pos_embed[:, 1:].reshape(1, pretrain_grid, pretrain_grid, channels).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False)
    # (1, C, H, W) -> (1, C, H*W) -> (1, H*W, C)
    return grid.reshape(1, channels, height * width).permute(0, 2, 1)
