"""Pure-PyTorch multi-scale deformable attention (the ground truth of every backend).

Follows the reference ViT-Adapter / Deformable-DETR sampling exactly
(docs/reference.md §P3, §P5): for each level the value map is sampled
bilinearly with zero padding and ``align_corners=False`` at ``grid = 2 * loc - 1``, i.e. at pixel
coordinate ``loc * size - 0.5``, where ``loc`` is the normalised (x, y) sampling location. The
samples of all levels and points are weighted by the attention weights and summed per head.

Values may be float32, float64, bfloat16 or float16. ``F.grid_sample`` needs the value map and
the grid in one dtype, and rounding a sampling location to 16 bits would move it by up to a tenth
of a pixel on a 64-wide map, so low-precision values are sampled in float32 against float32
locations, and the result is returned in the value dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def core_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the sampling runs in for values of ``dtype``: float64 stays float64 (rounding checks run the
    whole model in it), everything else runs in float32 (the reference's ``custom_fwd(cast_inputs=float32)``
    under autocast, docs/reference.md §P5)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def ms_deform_attn_pytorch(
    value: torch.Tensor,
    spatial_shapes: Sequence[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Reference multi-scale deformable attention.

    Args:
        value: (B, S, M, D) values of all levels concatenated along S, ``S = sum(H_l * W_l)``;
            M heads of D channels.
        spatial_shapes: L pairs ``(H_l, W_l)`` of Python ints, in the order of ``value``.
        sampling_locations: (B, Q, M, L, P, 2) normalised (x, y) locations in [0, 1] for points
            inside the map (outside points sample zeros), float32 or float64.
        attention_weights: (B, Q, M, L, P) weights (already softmax-normalised by the caller).

    Returns:
        (B, Q, M * D) in the dtype of ``value``.
    """
    batch, _, heads, channels = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    compute_dtype = core_dtype(value.dtype)
    value_c = value.to(compute_dtype)
    locations = sampling_locations.to(compute_dtype)
    weights = attention_weights.to(compute_dtype)

    # (B, S, M, D) -> per level (B, H*W, M, D)
    value_levels = value_c.split([h * w for h, w in spatial_shapes], dim=1)
    grids = 2.0 * locations - 1.0
    sampled = []
    for level, (h, w) in enumerate(spatial_shapes):
        # (B, H*W, M, D) -> (B, H*W, M*D) -> (B, M*D, H*W) -> (B*M, D, H, W)
        value_l = value_levels[level].flatten(2).transpose(1, 2).reshape(batch * heads, channels, h, w)
        # (B, Q, M, P, 2) -> (B, M, Q, P, 2) -> (B*M, Q, P, 2)
        grid_l = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        # (B*M, D, Q, P)
        sampled.append(
            F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    # (B, Q, M, L, P) -> (B, M, Q, L, P) -> (B*M, 1, Q, L*P)
    weights = weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels * points)
    # (B*M, D, Q, L, P) -> (B*M, D, Q, L*P); weighted sum over L*P -> (B*M, D, Q) -> (B, M*D, Q)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1).view(batch, heads * channels, queries)
    # (B, M*D, Q) -> (B, Q, M*D)
    return out.transpose(1, 2).contiguous().to(value.dtype)
