"""Injector, Extractor (with ConvFFN) and InteractionBlock (docs/reference.md §P3).

One interaction: the Injector adds spatial priors to the ViT tokens
(``x + gamma * MSDA(query_norm(x), feat_norm(c))`` over the 3 adapter levels), the interaction's
ViT blocks run (with the cls token in front for BEiT), then the Extractor pulls ViT features into
the adapter tokens (``c + MSDA(query_norm(c), feat_norm(x))``, then ``c + drop_path(ConvFFN(ffn_norm(c)))``);
the last interaction has two extra Extractors applied in sequence.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.utils.checkpoint as cp
from torch import nn

from models._timm import DropPath
from models.adapter.deform_inputs import DeformInputs
from models.adapter.ms_deform_attn import MSDeformAttn

LAYER_NORM_EPS = 1e-6
# The adapter tokens are [1/8; 1/16; 1/32] of the image: 16 + 4 + 1 = 21 parts of (H/32 * W/32)
_LEVEL_PARTS = (16, 4, 1)


def _maybe_checkpoint(enabled: bool, fn, *args: torch.Tensor) -> torch.Tensor:
    if enabled and torch.is_grad_enabled() and any(a.requires_grad for a in args):
        return cp.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class MultiScaleDWConv(nn.Module):
    """One depthwise 3x3 conv applied separately to the 1/8, 1/16 and 1/32 parts of the tokens.

    Args:
        dim: channels.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=3, stride=1, padding=1, bias=True, groups=dim)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(B, 21*h*w/4, C) tokens, (height, width) = the 1/16 grid -> same shape."""
        batch, length, channels = x.shape
        unit = length // sum(_LEVEL_PARTS)
        sizes = [(2 * height, 2 * width), (height, width), (height // 2, width // 2)]
        parts = x.split([p * unit for p in _LEVEL_PARTS], dim=1)
        outs = []
        for part, (h, w) in zip(parts, sizes, strict=True):
            # (B, h*w, C) -> (B, C, h*w) -> (B, C, h, w)
            fmap = part.transpose(1, 2).reshape(batch, channels, h, w)
            # (B, C, h, w) -> (B, C, h*w) -> (B, h*w, C)
            outs.append(self.dwconv(fmap).flatten(2).transpose(1, 2))
        return torch.cat(outs, dim=1)


class ConvFFN(nn.Module):
    """fc1 -> multi-scale depthwise conv -> GELU -> dropout -> fc2 -> dropout."""

    def __init__(self, *, in_features: int, hidden_features: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.dwconv = MultiScaleDWConv(hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(B, N, C) -> (B, N, C); (height, width) is the 1/16 grid."""
        x = self.drop(self.act(self.dwconv(self.fc1(x), height, width)))
        return self.drop(self.fc2(x))


class Injector(nn.Module):
    """Spatial priors into the ViT tokens: ``x + gamma * MSDA(query_norm(x), feat_norm(c))``."""

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        n_points: int,
        n_levels: int,
        deform_ratio: float,
        init_values: float,
        with_cp: bool = False,
    ) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))
        self.query_norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.feat_norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = MSDeformAttn(
            d_model=dim, n_levels=n_levels, n_heads=num_heads, n_points=n_points, ratio=deform_ratio
        )
        self.with_cp = with_cp

    def forward(self, x: torch.Tensor, c: torch.Tensor, inputs: DeformInputs) -> torch.Tensor:
        """x: (B, N, C) ViT tokens; c: (B, S, C) adapter tokens -> (B, N, C)."""

        def inner(query: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
            attn = self.attn(
                self.query_norm(query), inputs.reference_points, self.feat_norm(feat), inputs.spatial_shapes
            )
            return query + self.gamma * attn

        return _maybe_checkpoint(self.with_cp, inner, x, c)


class Extractor(nn.Module):
    """ViT features into the adapter tokens, then a ConvFFN with drop path."""

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        n_points: int,
        deform_ratio: float,
        cffn_ratio: float,
        drop_path: float,
        with_cffn: bool = True,
        with_cp: bool = False,
    ) -> None:
        super().__init__()
        self.query_norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.feat_norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = MSDeformAttn(
            d_model=dim, n_levels=1, n_heads=num_heads, n_points=n_points, ratio=deform_ratio
        )
        self.with_cffn = with_cffn
        if with_cffn:
            self.ffn = ConvFFN(in_features=dim, hidden_features=int(dim * cffn_ratio))
            self.ffn_norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
            self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.with_cp = with_cp

    def forward(
        self, c: torch.Tensor, x: torch.Tensor, inputs: DeformInputs, height: int, width: int
    ) -> torch.Tensor:
        """c: (B, S, C) adapter tokens; x: (B, N, C) ViT tokens on the (height, width) grid -> (B, S, C)."""

        def inner(query: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
            attn = self.attn(
                self.query_norm(query), inputs.reference_points, self.feat_norm(feat), inputs.spatial_shapes
            )
            query = query + attn
            if self.with_cffn:
                query = query + self.drop_path(self.ffn(self.ffn_norm(query), height, width))
            return query

        return _maybe_checkpoint(self.with_cp, inner, c, x)


class InteractionBlock(nn.Module):
    """Injector -> the interaction's trunk blocks -> Extractor (-> two extra Extractors if last).

    Args:
        dim: trunk width C.
        num_heads: deformable-attention heads.
        n_points: sampling points.
        deform_ratio: value width ratio of the deformable attention.
        cffn_ratio: ConvFFN hidden width ratio.
        drop_path: the backbone's drop-path rate (constant for every Extractor FFN).
        init_values: initial Injector ``gamma``.
        extra_extractor: add the two extra Extractors (the last interaction).
        with_cffn: use the ConvFFN in the Extractors.
        with_cp: gradient checkpointing of the Injector and Extractors.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        n_points: int,
        deform_ratio: float,
        cffn_ratio: float,
        drop_path: float,
        init_values: float,
        extra_extractor: bool,
        with_cffn: bool = True,
        with_cp: bool = False,
    ) -> None:
        super().__init__()
        self.injector = Injector(
            dim=dim,
            num_heads=num_heads,
            n_points=n_points,
            n_levels=3,
            deform_ratio=deform_ratio,
            init_values=init_values,
            with_cp=with_cp,
        )
        extractor_kwargs = {
            "dim": dim,
            "num_heads": num_heads,
            "n_points": n_points,
            "deform_ratio": deform_ratio,
            "cffn_ratio": cffn_ratio,
            "drop_path": drop_path,
            "with_cffn": with_cffn,
            "with_cp": with_cp,
        }
        self.extractor = Extractor(**extractor_kwargs)
        self.extra_extractors = (
            nn.ModuleList([Extractor(**extractor_kwargs) for _ in range(2)]) if extra_extractor else None
        )
        self.with_cp = with_cp

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        cls: torch.Tensor | None,
        blocks: Sequence[Callable[[torch.Tensor], torch.Tensor]],
        injector_inputs: DeformInputs,
        extractor_inputs: DeformInputs,
        height: int,
        width: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One interaction.

        Args:
            x: (B, N, C) ViT patch tokens (no cls), N = height*width.
            c: (B, S, C) adapter tokens [1/8; 1/16; 1/32].
            cls: (B, P, C) prefix tokens run through the blocks in front of the patch tokens and
                split off after them (BEiT: the cls token; the timm trunks: cls and register
                tokens), or None (ViT).
            blocks: the trunk blocks of this interaction (modules or callables, (B, L, C) -> (B, L, C)).
            injector_inputs, extractor_inputs: from :func:`models.adapter.deform_inputs.deform_inputs`.
            height, width: the adapter's 1/16 grid, which the ConvFFN splits by (the ViT patch grid
                for patch-16 trunks).

        Returns:
            (x, c, cls) after the interaction.
        """
        x = self.injector(x, c, injector_inputs)
        if cls is not None:
            x = torch.cat([cls, x], dim=1)  # (B, P + N, C)
        for block in blocks:
            x = _maybe_checkpoint(self.with_cp, block, x)
        if cls is not None:
            num_prefix = cls.shape[1]
            cls, x = x[:, :num_prefix], x[:, num_prefix:]
        c = self.extractor(c, x, extractor_inputs, height, width)
        if self.extra_extractors is not None:
            for extractor in self.extra_extractors:
                c = extractor(c, x, extractor_inputs, height, width)
        return x, c, cls
