"""The adapter's multi-scale deformable attention module (docs/reference.md §P3, "MSDeformAttn").

Projections as in the reference ``ops.modules.MSDeformAttn``: ``sampling_offsets``
(C -> heads*levels*points*2), ``attention_weights`` (C -> heads*levels*points, softmax jointly over
levels*points per head), ``value_proj`` (C -> C*ratio) and ``output_proj`` (C*ratio -> C). Offsets
are normalised by each level's (W, H) and added to the reference points. No query positional
embedding, no dropout and no residual here (the residual lives in Injector/Extractor).

The sampling itself is :func:`cuda_ops.ms_deform_attn`, in float32 under autocast as the reference's
``MSDeformAttnFunction`` (``custom_fwd(cast_inputs=torch.float32)``, docs/reference.md §P5): the values,
sampling locations and attention weights enter it in float32 (the offsets are divided by the level sizes in
the autocast dtype first, as the reference's expression does), and its output goes back to the values'
dtype before ``output_proj``. A float64 model stays in float64 throughout (for rounding checks); the
reference points, float32 in the reference, are cast up.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cuda_ops import core_dtype, ms_deform_attn


@functools.lru_cache(maxsize=64)
def _offset_normalizer(
    spatial_shapes: tuple[tuple[int, int], ...], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """(L, 2) (W_l, H_l) per level in ``dtype`` (exact: small integers), made once per shapes, device and
    dtype (no host-to-device copy per call)."""
    with torch.inference_mode(False):  # a cached inference tensor could not be saved for a later backward
        return torch.tensor([[w, h] for h, w in spatial_shapes], dtype=dtype, device=device)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention with the reference's projections and initialisation.

    Args:
        d_model: query and input width C.
        n_levels: number of feature levels L.
        n_heads: attention heads M.
        n_points: sampling points per head and level P.
        ratio: value width relative to C (0.5 for ViT-Adapter-B/L, 1.0 for T/S).
        backend: :func:`cuda_ops.ms_deform_attn` backend.
    """

    def __init__(
        self,
        *,
        d_model: int,
        n_levels: int,
        n_heads: int,
        n_points: int,
        ratio: float = 1.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        value_dim = int(d_model * ratio)
        if value_dim % n_heads:
            raise ValueError(
                f"value width {value_dim} (d_model*ratio) must be divisible by n_heads={n_heads}"
            )
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.value_dim = value_dim
        self.backend = backend
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, value_dim)
        self.output_proj = nn.Linear(value_dim, d_model)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Deformable-DETR initialisation: offsets start on rings of radius 1..P, one direction per head."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([thetas.cos(), thetas.sin()], dim=-1)  # (M, 2)
        directions = directions / directions.abs().max(dim=-1, keepdim=True).values
        # (M, 2) -> (M, L, P, 2), point p scaled by p + 1
        grid = directions[:, None, None, :].repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32)[None, None, :, None]
        self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        features: torch.Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
    ) -> torch.Tensor:
        """Attend from ``query`` to the multi-level ``features``.

        Args:
            query: (B, Q, C).
            reference_points: (B or 1, Q, L or 1, 2) normalised (x, y) reference points.
            features: (B, S, C) all levels flattened and concatenated, ``S = sum(H_l * W_l)``.
            spatial_shapes: L pairs (H_l, W_l) of Python ints.

        Returns:
            (B, Q, C).
        """
        batch, queries, _ = query.shape
        length = features.shape[1]
        # (B, S, C*ratio) -> (B, S, M, D)
        value = self.value_proj(features).view(batch, length, self.n_heads, self.value_dim // self.n_heads)
        core = core_dtype(value.dtype)  # float32 under autocast (the reference's custom_fwd), else as is
        # (B, Q, M*L*P*2) -> (B, Q, M, L, P, 2)
        offsets = self.sampling_offsets(query).view(
            batch, queries, self.n_heads, self.n_levels, self.n_points, 2
        )
        # (B, Q, M*L*P) -> (B, Q, M, L*P), softmax over levels and points -> (B, Q, M, L, P)
        weights = self.attention_weights(query).view(
            batch, queries, self.n_heads, self.n_levels * self.n_points
        )
        weights = F.softmax(weights.to(core), dim=-1).view(
            batch, queries, self.n_heads, self.n_levels, self.n_points
        )
        # (L, 2) as (W, H), in the offsets' dtype: the reference divides before adding the float32 points
        normalizer = _offset_normalizer(tuple(spatial_shapes), query.device, offsets.dtype)
        # (B, Q, 1, L, 1, 2) + (B, Q, M, L, P, 2) / (1, 1, 1, L, 1, 2)
        locations = reference_points.to(core)[:, :, None, :, None, :] + (
            offsets / normalizer[None, None, None, :, None, :]
        ).to(core)
        out = self.sample(value.to(core), spatial_shapes, locations, weights)
        return self.output_proj(out.to(value.dtype))

    def sample(
        self,
        value: torch.Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
        locations: torch.Tensor,
        weights: torch.Tensor,
    ) -> torch.Tensor:
        """The bilinear sampling and weighted sum (:func:`cuda_ops.ms_deform_attn` on the module's backend).

        A method of its own so that the rounding checks can pin its bilinear cells per module instance
        (a sampling location within rounding of a pixel edge: tests/rounding.py ``BranchPins``).
        """
        return ms_deform_attn(value, spatial_shapes, locations, weights, backend=self.backend)
