"""Reference points and level shapes of the adapter's deformable attention (docs/reference.md §P3,
"deform_inputs").

Everything derives from the input size with floor division: the Injector (ViT tokens querying the
three SPM levels) gets the 1/8, 1/16, 1/32 shapes and the 1/16 cell centres as reference points;
the Extractor (adapter tokens querying the ViT tokens) gets the single 1/16 shape and the cell
centres of all three levels. A cell (i, j) of an (H, W) grid has reference point
``((j + 0.5) / W, (i + 0.5) / H)``, x first, in row-major order.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# strides of the adapter's token levels (c2, c3, c4) and of the ViT patch grid
ADAPTER_STRIDES = (8, 16, 32)
VIT_STRIDE = 16


class DeformInputs(NamedTuple):
    """Reference points (1, Q, 1, 2) and the (H, W) shapes of the attended levels."""

    reference_points: torch.Tensor
    spatial_shapes: list[tuple[int, int]]


def cell_centres(shapes: list[tuple[int, int]], device: torch.device | None = None) -> torch.Tensor:
    """Normalised centres of every cell of each (H, W) grid, concatenated: (1, sum H*W, 1, 2)."""
    points = []
    for height, width in shapes:
        ys = (torch.arange(height, dtype=torch.float32, device=device) + 0.5) / height
        xs = (torch.arange(width, dtype=torch.float32, device=device) + 0.5) / width
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        # (H, W) each -> (H*W, 2) as (x, y)
        points.append(torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=-1))
    # (sum HW, 2) -> (1, sum HW, 1, 2)
    return torch.cat(points, dim=0)[None, :, None, :]


def deform_inputs(
    height: int, width: int, device: torch.device | None = None
) -> tuple[DeformInputs, DeformInputs]:
    """Injector and Extractor inputs for an image of ``height`` x ``width`` pixels."""
    adapter_shapes = [(height // s, width // s) for s in ADAPTER_STRIDES]
    vit_shape = [(height // VIT_STRIDE, width // VIT_STRIDE)]
    injector = DeformInputs(cell_centres(vit_shape, device), adapter_shapes)
    extractor = DeformInputs(cell_centres(adapter_shapes, device), vit_shape)
    return injector, extractor
