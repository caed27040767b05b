"""Sine positional encoding of Mask2Former (mmdet 2.x ``SinePositionalEncoding``), docs/reference.md §P4.

``normalize=True``, scale 2π, eps 1e-6, temperature 10000, offset 0, no padding mask (every position
valid): the row and column indices 1..H and 1..W are scaled to (0, 2π], divided by
``temperature ** (2 * (k // 2) / num_feats)`` and turned into sin (even k) / cos (odd k) pairs that
are **interleaved** (stack then flatten, not concatenated). The y encoding comes **first** in the
channel dimension, then x. The same encoding serves the pixel decoder (plus a learned level
encoding) and the transformer decoder's keys.
"""

from __future__ import annotations

import math

import torch

TEMPERATURE = 10000
SCALE = 2 * math.pi
EPS = 1e-6


def _interleave_sin_cos(angles: torch.Tensor) -> torch.Tensor:
    """(..., F) angles -> (..., F): sin of the even channels and cos of the odd ones, interleaved."""
    # (..., F/2) and (..., F/2) -> (..., F/2, 2) -> (..., F)
    return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)


def sine_positional_encoding(
    height: int, width: int, *, num_feats: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """The normalised sine encoding of an unpadded ``height`` x ``width`` map.

    Args:
        height, width: map size (Python ints).
        num_feats: channels per axis (half the output channels); must be even.
        device: where to build it.

    Returns:
        (1, 2 * num_feats, height, width) float32, channels ``[pos_y, pos_x]``.

    Raises:
        ValueError: if ``num_feats`` is odd.
    """
    if num_feats % 2:
        raise ValueError(f"num_feats={num_feats} must be even (sin/cos pairs)")
    # the cumulative sums of an all-valid mask are 1..H and 1..W, normalised by the last one
    y_embed = torch.arange(1, height + 1, dtype=torch.float32, device=device)
    x_embed = torch.arange(1, width + 1, dtype=torch.float32, device=device)
    y_embed = y_embed / (y_embed[-1:] + EPS) * SCALE
    x_embed = x_embed / (x_embed[-1:] + EPS) * SCALE
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=device)
    dim_t = TEMPERATURE ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    pos_y = _interleave_sin_cos(y_embed[:, None] / dim_t)  # (H, F)
    pos_x = _interleave_sin_cos(x_embed[:, None] / dim_t)  # (W, F)
    pos = torch.cat(
        (
            pos_y[:, None, :].expand(height, width, num_feats),
            pos_x[None, :, :].expand(height, width, num_feats),
        ),
        dim=-1,
    )  # (H, W, 2F)
    # (H, W, 2F) -> (1, 2F, H, W)
    return pos.permute(2, 0, 1).unsqueeze(0).contiguous()
