"""The Mask2Former decode head (Cheng et al., "Masked-attention Mask Transformer for Universal Image
Segmentation", CVPR 2022) as ViT-Adapter's ``mmseg_custom`` ``Mask2FormerHead`` builds it
(mmdet 2.x semantics), docs/reference.md §P4.

Forward:

1. The pixel decoder gives the 1/4 ``mask_features`` and three memories (1/32, 1/16, 1/8).
2. Decoder inputs: each memory flattened + its learned ``level_embed`` (``decoder_input_projs`` are
   Identity because the decoder width equals ``feat_channels`` in every config, so they have no
   parameters and are not built); keys get the sine encoding of their level.
3. ``query_feat`` (content) and ``query_embed`` (position) are separate learned embeddings.
4. A prediction before the first layer and after each of the 9 layers (``forward_head``): the
   decoder ``post_norm``, ``cls_embed`` (num_classes + 1 outputs, the last = no object), the 3-layer
   ``mask_embed`` MLP, ``mask = einsum(mask_embed, mask_features)`` at 1/4; that mask resized
   bilinearly to the **next** layer's memory size gives the attention mask ``sigmoid(mask) < 0.5``
   (True = blocked), the same for every head.
5. Layer ``i`` attends to level ``i % 3`` (1/32, 1/16, 1/8, 1/32, ...); before it, query rows whose
   mask blocks every key are fully unblocked.

The BaseDecodeHead ``conv_seg`` of the reference is deleted there, so it has no counterpart here.
Parameter names and order equal the official checkpoints (``decode_head.*``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.config import Mask2FormerConfig
from models.heads.mask2former.pixel_decoder import MSDeformAttnPixelDecoder
from models.heads.mask2former.positional_encoding import sine_positional_encoding
from models.heads.mask2former.transformer_decoder import MaskedAttentionDecoder

# attention masks block keys where the resized mask probability is below this
ATTN_MASK_THRESHOLD = 0.5


class Mask2FormerHead(nn.Module):
    """Pixel decoder + masked-attention transformer decoder + class and mask predictions.

    Args:
        in_channels: channels of the four backbone maps, finest first.
        strides: their strides (4, 8, 16, 32).
        num_classes: K (the class layer has K + 1 outputs).
        config: widths, heads, queries and depths.

    Attributes:
        num_classes: K.
        num_queries: Q.
    """

    def __init__(
        self,
        *,
        in_channels: Sequence[int],
        strides: Sequence[int],
        num_classes: int,
        config: Mask2FormerConfig,
    ) -> None:
        super().__init__()
        feat = config.feat_channels
        self.num_classes = num_classes
        self.num_queries = config.num_queries
        self.num_levels = config.num_feature_levels
        self.pixel_decoder = MSDeformAttnPixelDecoder(
            in_channels=in_channels,
            strides=strides,
            feat_channels=feat,
            out_channels=config.out_channels,
            num_encoder_levels=config.num_feature_levels,
            num_encoder_layers=config.num_encoder_layers,
            num_heads=config.encoder_num_heads,
            feedforward_channels=config.encoder_ffn_channels,
            with_cp=config.with_cp,
        )
        self.transformer_decoder = MaskedAttentionDecoder(
            num_layers=config.num_decoder_layers,
            embed_dims=feat,
            num_heads=config.decoder_num_heads,
            feedforward_channels=config.decoder_ffn_channels,
            with_cp=config.with_cp,
        )
        self.query_embed = nn.Embedding(config.num_queries, feat)
        self.query_feat = nn.Embedding(config.num_queries, feat)
        self.level_embed = nn.Embedding(config.num_feature_levels, feat)
        self.cls_embed = nn.Linear(feat, num_classes + 1)
        self.mask_embed = nn.Sequential(
            nn.Linear(feat, feat),
            nn.ReLU(inplace=True),
            nn.Linear(feat, feat),
            nn.ReLU(inplace=True),
            nn.Linear(feat, config.out_channels),
        )
        if self.cls_embed.weight.device.type != "meta":  # shapes only (parameter counting): nothing to init
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The reference initialisation (``Mask2FormerHead.init_weights``): the pixel decoder's own
        rule, Xavier-normal matrices in the transformer decoder; the embeddings keep N(0, 1) and
        ``cls_embed``/``mask_embed`` PyTorch's default Linear init."""
        self.pixel_decoder.init_weights()
        self.transformer_decoder.init_weights()

    def _predict(
        self, query: torch.Tensor, mask_features: torch.Tensor, attn_size: tuple[int, int] | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``forward_head``: (B, Q, C) queries -> class logits, mask logits, next attention mask.

        Returns:
            cls_pred (B, Q, K + 1), mask_pred (B, Q, H/4, W/4) and, when ``attn_size`` is given,
            the (B, Q, h*w) bool mask (True = blocked) at that size, detached.
        """
        out = self.transformer_decoder.post_norm(query)
        cls_pred = self.cls_embed(out)
        mask_pred = torch.einsum("bqc,bchw->bqhw", self.mask_embed(out), mask_features)
        if attn_size is None:
            return cls_pred, mask_pred, None
        resized = F.interpolate(mask_pred, size=attn_size, mode="bilinear", align_corners=False)
        # (B, Q, h, w) -> (B, Q, h*w)
        attn_mask = resized.flatten(2).sigmoid() < ATTN_MASK_THRESHOLD
        return cls_pred, mask_pred, attn_mask.detach()

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """All stage predictions.

        Args:
            features: the four backbone maps (B, C_i, H/s, W/s), finest first.

        Returns:
            ``cls_preds``: 1 + num_decoder_layers tensors (B, Q, K + 1) (stage 0 = before the first
            layer); ``mask_preds``: as many (B, Q, H/4, W/4) mask logits.
        """
        mask_features, memories = self.pixel_decoder(features)
        batch = mask_features.shape[0]
        heads = self.transformer_decoder.num_heads
        inputs, key_pos, sizes = [], [], []
        for i, memory in enumerate(memories):
            height, width = memory.shape[-2:]
            # (B, C, h, w) -> (B, h*w, C)
            inputs.append(memory.flatten(2).transpose(1, 2) + self.level_embed.weight[i])
            pos = sine_positional_encoding(
                height, width, num_feats=memory.shape[1] // 2, device=memory.device
            )
            key_pos.append(pos.flatten(2).transpose(1, 2))  # (1, C, h, w) -> (1, h*w, C)
            sizes.append((int(height), int(width)))
        query = self.query_feat.weight.unsqueeze(0).expand(batch, -1, -1)  # (Q, C) -> (B, Q, C)
        query_pos = self.query_embed.weight.unsqueeze(0)  # (Q, C) -> (1, Q, C)

        layers = self.transformer_decoder.layers
        cls_pred, mask_pred, attn_mask = self._predict(query, mask_features, sizes[0])
        cls_preds, mask_preds = [cls_pred], [mask_pred]
        for i, layer in enumerate(layers):
            level = i % self.num_levels
            # a query whose mask blocks every key attends everywhere instead
            attn_mask = attn_mask & ~attn_mask.all(dim=-1, keepdim=True)
            # (B, Q, S) -> (B * heads, Q, S), batch-major as torch.nn.MultiheadAttention expects
            attn_mask = attn_mask.repeat_interleave(heads, dim=0)
            query = layer(
                query, inputs[level], query_pos=query_pos, key_pos=key_pos[level], attn_mask=attn_mask
            )
            next_size = sizes[(i + 1) % self.num_levels] if i + 1 < len(layers) else None
            cls_pred, mask_pred, attn_mask = self._predict(query, mask_features, next_size)
            cls_preds.append(cls_pred)
            mask_preds.append(mask_pred)
        return cls_preds, mask_preds
