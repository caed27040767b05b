"""Mask2Former's multi-scale deformable-attention pixel decoder (mmdet 2.x
``MSDeformAttnPixelDecoder`` as built by the ViT-Adapter configs), docs/reference.md §P4.

* The three coarsest backbone maps go through ``input_convs`` in the order **1/32, 1/16, 1/8**
  (coarse first): 1x1 conv with bias + GroupNorm(32), no activation.
* A 6-layer deformable encoder over their concatenated tokens. Each layer is post-norm
  ``self_attn, norm, ffn, norm`` (LayerNorm eps 1e-5, ReLU FFN). The attention is the project's one
  multi-scale deformable attention (:class:`models.adapter.MSDeformAttn` with value ratio 1.0, i.e.
  mmcv's ``MultiScaleDeformableAttention`` without dropout): query = tokens + ``query_pos``, value =
  the tokens **without** position, identity residual. ``query_pos`` = sine encoding + the learned
  ``level_encoding`` of the level.
* Reference points: every token's own centre ``((j + 0.5) / w, (i + 0.5) / h)``
  (``MlvlPointGenerator`` offset 0.5, normalised by the level size), the same normalised point for
  every level.
* The 1/4 map: lateral 1x1 conv (no bias) + GN, plus the bilinearly upsampled (``align_corners=False``)
  1/8 encoder output, then 3x3 conv (no bias) + GN + ReLU; ``mask_feature`` = 1x1 conv with bias.

Parameter names and order equal the official checkpoints (``decode_head.pixel_decoder.*``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.adapter import MSDeformAttn
from models.heads.mask2former.ffn import FFN
from models.heads.mask2former.positional_encoding import sine_positional_encoding

GN_GROUPS = 32
# MlvlPointGenerator: token centres
POINT_OFFSET = 0.5


class ConvGN(nn.Module):
    """mmcv ``ConvModule`` with GroupNorm(32): ``conv`` -> ``gn`` (-> ReLU).

    Args:
        in_channels, out_channels: conv channels (``out_channels`` divisible by 32).
        kernel_size: square kernel; padding keeps the size.
        bias: conv bias (True only for the encoder input projections).
        activate: apply ReLU after the norm.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, *, bias: bool, activate: bool
    ) -> None:
        super().__init__()
        if out_channels % GN_GROUPS:
            raise ValueError(
                f"GroupNorm({GN_GROUPS}) needs channels divisible by {GN_GROUPS}, got {out_channels}"
            )
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)
        self.gn = nn.GroupNorm(GN_GROUPS, out_channels)
        self.activate = nn.ReLU(inplace=True) if activate else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) -> (B, out_channels, H, W)."""
        return self.activate(self.gn(self.conv(x)))


class DeformableEncoderLayer(nn.Module):
    """Post-norm ``self_attn, norm, ffn, norm`` with multi-scale deformable self-attention.

    Args:
        embed_dims: token width C.
        num_heads: attention heads.
        num_levels: feature levels.
        num_points: sampling points per head and level.
        feedforward_channels: FFN hidden width.
        with_cp: gradient checkpointing of the FFN.
    """

    def __init__(
        self,
        *,
        embed_dims: int,
        num_heads: int,
        num_levels: int,
        num_points: int,
        feedforward_channels: int,
        with_cp: bool,
    ) -> None:
        super().__init__()
        self.attentions = nn.ModuleList(
            [
                MSDeformAttn(
                    d_model=embed_dims, n_levels=num_levels, n_heads=num_heads, n_points=num_points, ratio=1.0
                )
            ]
        )
        self.ffns = nn.ModuleList(
            [FFN(embed_dims=embed_dims, feedforward_channels=feedforward_channels, with_cp=with_cp)]
        )
        self.norms = nn.ModuleList([nn.LayerNorm(embed_dims), nn.LayerNorm(embed_dims)])

    def forward(
        self,
        query: torch.Tensor,
        query_pos: torch.Tensor,
        reference_points: torch.Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
    ) -> torch.Tensor:
        """Refine the tokens of all levels.

        Args:
            query: (B, S, C) tokens of all levels, coarse first.
            query_pos: (1 or B, S, C) positional + level encoding.
            reference_points: (1, S, 1, 2) normalised (x, y) token centres.
            spatial_shapes: (h, w) per level, Python ints.

        Returns:
            (B, S, C).
        """
        attended = self.attentions[0](query + query_pos, reference_points, query, spatial_shapes)
        query = self.norms[0](query + attended)
        return self.norms[1](self.ffns[0](query))


class DeformableEncoder(nn.Module):
    """The stack of :class:`DeformableEncoderLayer` (mmcv ``DetrTransformerEncoder``, no final norm)."""

    def __init__(self, *, num_layers: int, **layer_kwargs: int | bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList([DeformableEncoderLayer(**layer_kwargs) for _ in range(num_layers)])

    def forward(
        self,
        query: torch.Tensor,
        query_pos: torch.Tensor,
        reference_points: torch.Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
    ) -> torch.Tensor:
        """(B, S, C) -> (B, S, C); see :meth:`DeformableEncoderLayer.forward`."""
        for layer in self.layers:
            query = layer(query, query_pos, reference_points, spatial_shapes)
        return query


def token_centres(height: int, width: int, stride: int, device: torch.device) -> torch.Tensor:
    """Normalised (x, y) centres of a ``height`` x ``width`` level, row-major: (h*w, 2) float32."""
    xs = (torch.arange(width, device=device) + POINT_OFFSET) * stride / (width * stride)
    ys = (torch.arange(height, device=device) + POINT_OFFSET) * stride / (height * stride)
    # (h, w) grids, x varying fastest -> (h*w, 2)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((grid_x.reshape(-1), grid_y.reshape(-1)), dim=-1).float()


class MSDeformAttnPixelDecoder(nn.Module):
    """Pixel decoder: deformable encoder on the coarse levels, FPN step to 1/4, mask features.

    Args:
        in_channels: channels of the backbone maps, finest (1/4) first.
        strides: their strides, e.g. (4, 8, 16, 32).
        feat_channels: width of the decoder (divisible by 32).
        out_channels: width of the mask features.
        num_encoder_levels: coarsest levels through the encoder (3).
        num_encoder_layers: encoder depth (6).
        num_heads: deformable attention heads.
        feedforward_channels: encoder FFN hidden width.
        num_points: sampling points per head and level (4).
        with_cp: gradient checkpointing of the encoder FFNs.
    """

    def __init__(
        self,
        *,
        in_channels: Sequence[int],
        strides: Sequence[int],
        feat_channels: int,
        out_channels: int,
        num_encoder_levels: int,
        num_encoder_layers: int,
        num_heads: int,
        feedforward_channels: int,
        num_points: int = 4,
        with_cp: bool = False,
    ) -> None:
        super().__init__()
        if len(in_channels) != len(strides):
            raise ValueError(f"in_channels {list(in_channels)} and strides {list(strides)} differ in length")
        if not 1 <= num_encoder_levels < len(in_channels):
            raise ValueError(
                f"num_encoder_levels={num_encoder_levels} must be in [1, {len(in_channels) - 1}] "
                f"for {len(in_channels)} input levels"
            )
        if feat_channels % 2:
            raise ValueError(f"feat_channels={feat_channels} must be even (sine encoding)")
        self.strides = tuple(strides)
        self.num_inputs = len(in_channels)
        self.num_encoder_levels = num_encoder_levels
        self.feat_channels = feat_channels
        # coarse to fine: input_convs[0] projects the 1/32 map
        self.input_convs = nn.ModuleList(
            [
                ConvGN(in_channels[level], feat_channels, 1, bias=True, activate=False)
                for level in range(self.num_inputs - 1, self.num_inputs - num_encoder_levels - 1, -1)
            ]
        )
        self.encoder = DeformableEncoder(
            num_layers=num_encoder_layers,
            embed_dims=feat_channels,
            num_heads=num_heads,
            num_levels=num_encoder_levels,
            num_points=num_points,
            feedforward_channels=feedforward_channels,
            with_cp=with_cp,
        )
        self.level_encoding = nn.Embedding(num_encoder_levels, feat_channels)
        fine_levels = range(self.num_inputs - num_encoder_levels - 1, -1, -1)
        self.lateral_convs = nn.ModuleList(
            [
                ConvGN(in_channels[level], feat_channels, 1, bias=False, activate=False)
                for level in fine_levels
            ]
        )
        self.output_convs = nn.ModuleList(
            [ConvGN(feat_channels, feat_channels, 3, bias=False, activate=True) for _ in fine_levels]
        )
        self.mask_feature = nn.Conv2d(feat_channels, out_channels, kernel_size=1)

    @torch.no_grad()
    def init_weights(self) -> None:
        """The reference initialisation: input projections Xavier-uniform, the FPN convs and
        ``mask_feature`` caffe2-Xavier (Kaiming-uniform, a=1), conv biases 0, ``level_encoding``
        N(0, 1), encoder matrices Xavier-normal, then each deformable attention's own init."""
        for conv in self.input_convs:
            nn.init.xavier_uniform_(conv.conv.weight, gain=1.0)
            nn.init.zeros_(conv.conv.bias)
        for conv in [*(c.conv for c in self.lateral_convs), *(c.conv for c in self.output_convs)]:
            nn.init.kaiming_uniform_(conv.weight, a=1)
        nn.init.kaiming_uniform_(self.mask_feature.weight, a=1)
        nn.init.zeros_(self.mask_feature.bias)
        nn.init.normal_(self.level_encoding.weight, mean=0.0, std=1.0)
        for param in self.encoder.parameters():
            if param.dim() > 1:
                nn.init.xavier_normal_(param)
        for layer in self.encoder.layers:
            layer.attentions[0].reset_parameters()

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Decode the backbone maps.

        Args:
            features: ``num_inputs`` maps (B, C_i, H/s_i, W/s_i), finest first.

        Returns:
            ``mask_features`` (B, out_channels, H/4, W/4) and the multi-scale memories
            [(B, feat_channels, H/32, W/32), (.., H/16, W/16), (.., H/8, W/8)] (coarse first).
        """
        if len(features) != self.num_inputs:
            raise ValueError(f"expected {self.num_inputs} feature maps, got {len(features)}")
        batch = features[0].shape[0]
        device = features[0].device
        tokens, positions, centres, shapes = [], [], [], []
        for i in range(self.num_encoder_levels):
            level = self.num_inputs - 1 - i
            feature = features[level]
            height, width = feature.shape[-2:]
            projected = self.input_convs[i](feature)  # (B, C, h, w)
            pos = sine_positional_encoding(height, width, num_feats=self.feat_channels // 2, device=device)
            pos = pos + self.level_encoding.weight[i].view(1, -1, 1, 1)  # (1, C, h, w)
            tokens.append(projected.flatten(2).transpose(1, 2))  # (B, C, h, w) -> (B, h*w, C)
            positions.append(pos.flatten(2).transpose(1, 2))  # (1, C, h, w) -> (1, h*w, C)
            centres.append(token_centres(height, width, self.strides[level], device))
            shapes.append((int(height), int(width)))
        query = torch.cat(tokens, dim=1)  # (B, S, C), S = sum of h*w, coarse first
        query_pos = torch.cat(positions, dim=1)  # (1, S, C)
        # (S, 2) -> (1, S, 1, 2): one point per token, shared by every level
        reference_points = torch.cat(centres, dim=0)[None, :, None, :]
        memory = self.encoder(query, query_pos, reference_points, shapes)

        memory = memory.transpose(1, 2)  # (B, S, C) -> (B, C, S)
        chunks = memory.split([h * w for h, w in shapes], dim=-1)  # per level (B, C, h*w)
        # (B, C, h*w) -> (B, C, h, w) per level
        outs = [chunk.reshape(batch, -1, h, w) for chunk, (h, w) in zip(chunks, shapes, strict=True)]
        for i in range(self.num_inputs - self.num_encoder_levels - 1, -1, -1):
            lateral = self.lateral_convs[i](features[i])
            coarser = F.interpolate(outs[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            outs.append(self.output_convs[i](lateral + coarser))
        return self.mask_feature(outs[-1]), outs[: self.num_encoder_levels]
