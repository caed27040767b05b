"""The feed-forward block of Mask2Former's transformer layers (mmcv 1.x ``FFN``), docs/reference.md §P4.

``Linear(C, F) -> ReLU -> Linear(F, C)`` plus the identity (the residual lives inside, as in mmcv);
dropout is 0 in every reference config and omitted. Parameter names ``layers.0.0`` / ``layers.1``
match the official checkpoints. ``with_cp`` recomputes the block in the backward pass (gradient
checkpointing, the reference's ``ffn_cfgs.with_cp`` of the BEiT-Adapter-L configs).
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint as cp
from torch import nn


class FFN(nn.Module):
    """Two-layer ReLU MLP with an identity residual.

    Args:
        embed_dims: input and output width C.
        feedforward_channels: hidden width F.
        with_cp: gradient checkpointing when the input requires grad.
    """

    def __init__(self, *, embed_dims: int, feedforward_channels: int, with_cp: bool = False) -> None:
        super().__init__()
        self.with_cp = with_cp
        self.layers = nn.Sequential(
            nn.Sequential(nn.Linear(embed_dims, feedforward_channels), nn.ReLU(inplace=True)),
            nn.Linear(feedforward_channels, embed_dims),
        )

    def _residual(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layers(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., C) -> (..., C)."""
        if self.with_cp and x.requires_grad:
            return cp.checkpoint(self._residual, x, use_reentrant=False)
        return self._residual(x)
