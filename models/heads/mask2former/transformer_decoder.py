"""Mask2Former's masked-attention transformer decoder layers (mmcv 1.x ``DetrTransformerDecoderLayer``
with ``MultiheadAttention``, as the ViT-Adapter configs build them), docs/reference.md §P4.

Each layer is post-norm ``cross_attn, norm, self_attn, norm, ffn, norm`` (LayerNorm eps 1e-5):

* cross-attention (``attentions.0``): q = query + ``query_pos``, k = memory + ``key_pos`` (sine
  encoding of the level), v = memory (no position), with the boolean mask (True = blocked) from
  the previous prediction;
* self-attention (``attentions.1``): q = k = query + ``query_pos``, v = query, no mask;
* every attention adds its output to the query **without** position (the mmcv identity).

The decoder owns the 9 layers and the ``post_norm`` applied before every prediction (the head's
``forward_head``). Parameter names equal the official checkpoints
(``decode_head.transformer_decoder.*``; ``attn`` is a ``torch.nn.MultiheadAttention``).
Attention and projection dropout are 0 in every reference config and omitted.
"""

from __future__ import annotations

import torch
from torch import nn

from models.heads.mask2former.ffn import FFN


class PositionalMultiheadAttention(nn.Module):
    """mmcv ``MultiheadAttention``: positions added to q and k, identity residual.

    Args:
        embed_dims: width C.
        num_heads: attention heads.
    """

    def __init__(self, *, embed_dims: int, num_heads: int) -> None:
        super().__init__()
        if embed_dims % num_heads:
            raise ValueError(f"embed_dims={embed_dims} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.attn = nn.MultiheadAttention(embed_dims, num_heads, batch_first=True)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *,
        query_pos: torch.Tensor,
        key_pos: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend and add the identity.

        Args:
            query: (B, Q, C).
            key, value: (B, S, C).
            query_pos: (B or 1, Q, C).
            key_pos: (B or 1, S, C).
            attn_mask: (B * heads, Q, S) bool, True = not attended; or None.

        Returns:
            (B, Q, C).
        """
        out, _ = self.attn(query + query_pos, key + key_pos, value, attn_mask=attn_mask, need_weights=False)
        return query + out


class MaskedAttentionDecoderLayer(nn.Module):
    """``cross_attn, norm, self_attn, norm, ffn, norm``.

    Args:
        embed_dims: width C.
        num_heads: heads of both attentions.
        feedforward_channels: FFN hidden width.
        with_cp: gradient checkpointing of the FFN.
    """

    def __init__(self, *, embed_dims: int, num_heads: int, feedforward_channels: int, with_cp: bool) -> None:
        super().__init__()
        self.attentions = nn.ModuleList(
            [
                PositionalMultiheadAttention(embed_dims=embed_dims, num_heads=num_heads),
                PositionalMultiheadAttention(embed_dims=embed_dims, num_heads=num_heads),
            ]
        )
        self.ffns = nn.ModuleList(
            [FFN(embed_dims=embed_dims, feedforward_channels=feedforward_channels, with_cp=with_cp)]
        )
        self.norms = nn.ModuleList([nn.LayerNorm(embed_dims) for _ in range(3)])

    def forward(
        self,
        query: torch.Tensor,
        memory: torch.Tensor,
        *,
        query_pos: torch.Tensor,
        key_pos: torch.Tensor,
        attn_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """One decoder step.

        Args:
            query: (B, Q, C) query features.
            memory: (B, S, C) one level of the pixel decoder (+ level embedding).
            query_pos: (B or 1, Q, C) query positional embedding.
            key_pos: (B or 1, S, C) sine encoding of the level.
            attn_mask: (B * heads, Q, S) bool masked-attention mask (True = blocked) or None.

        Returns:
            (B, Q, C).
        """
        cross, self_attn = self.attentions
        query = self.norms[0](
            cross(query, memory, memory, query_pos=query_pos, key_pos=key_pos, attn_mask=attn_mask)
        )
        query = self.norms[1](self_attn(query, query, query, query_pos=query_pos, key_pos=query_pos))
        return self.norms[2](self.ffns[0](query))


class MaskedAttentionDecoder(nn.Module):
    """The decoder layers and the shared ``post_norm`` (mmcv ``DetrTransformerDecoder``).

    Args:
        num_layers: decoder depth (9).
        embed_dims, num_heads, feedforward_channels, with_cp: see :class:`MaskedAttentionDecoderLayer`.
    """

    def __init__(
        self, *, num_layers: int, embed_dims: int, num_heads: int, feedforward_channels: int, with_cp: bool
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.layers = nn.ModuleList(
            [
                MaskedAttentionDecoderLayer(
                    embed_dims=embed_dims,
                    num_heads=num_heads,
                    feedforward_channels=feedforward_channels,
                    with_cp=with_cp,
                )
                for _ in range(num_layers)
            ]
        )
        self.post_norm = nn.LayerNorm(embed_dims)

    @torch.no_grad()
    def init_weights(self) -> None:
        """The reference initialisation: every matrix Xavier-normal (biases keep their defaults)."""
        for param in self.parameters():
            if param.dim() > 1:
                nn.init.xavier_normal_(param)
