"""Point sampling of Mask2Former's matcher and losses (mmcv ``point_sample`` and mmdet
``get_uncertain_point_coords_with_randomness``), docs/reference.md §R2.4.

Points are (x, y) in [0, 1] of the whole map; values are read with bilinear ``grid_sample``
(``align_corners=False``, zero padding), so a binary target mask sampled at a point on a class
border gives a fractional target, as in the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def point_sample(maps: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinear values of ``maps`` at normalised points.

    Args:
        maps: (N, C, H, W).
        points: (N, P, 2) (x, y) in [0, 1].

    Returns:
        (N, C, P).
    """
    # (N, P, 2) -> (N, P, 1, 2) in grid_sample's [-1, 1] coordinates
    grid = (2.0 * points - 1.0).unsqueeze(2)
    # (N, C, P, 1) -> (N, C, P)
    return F.grid_sample(maps, grid.to(maps.dtype), mode="bilinear", align_corners=False).squeeze(3)


@torch.no_grad()
def uncertain_point_coords(
    mask_logits: torch.Tensor,
    *,
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
) -> torch.Tensor:
    """Importance sampling: the most uncertain of ``num_points * oversample_ratio`` random points
    (uncertainty = -|logit|), topped up with uniformly random points.

    Args:
        mask_logits: (N, 1, H, W).
        num_points: points per mask P.
        oversample_ratio: candidates per point (3).
        importance_sample_ratio: share of P taken from the most uncertain candidates (0.75).

    Returns:
        (N, P, 2) points in [0, 1].
    """
    count = mask_logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    candidates = torch.rand(count, num_sampled, 2, device=mask_logits.device)
    uncertainty = -point_sample(mask_logits, candidates)[:, 0].abs()  # (N, num_sampled)
    num_uncertain = int(importance_sample_ratio * num_points)
    index = uncertainty.topk(num_uncertain, dim=1).indices  # (N, num_uncertain)
    chosen = candidates.gather(1, index[..., None].expand(-1, -1, 2))  # (N, num_uncertain, 2)
    num_random = num_points - num_uncertain
    if num_random > 0:
        chosen = torch.cat((chosen, torch.rand(count, num_random, 2, device=mask_logits.device)), dim=1)
    return chosen
