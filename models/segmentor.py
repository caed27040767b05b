"""Encoder-decoder segmentor (mmsegmentation 0.x ``EncoderDecoder`` semantics), docs/reference.md §P4.

``forward`` returns the decode head's logits at 1/4 resolution; ``predict`` is whole-image
inference: those logits bilinearly resized (``align_corners=False``) to the input size, before
softmax; ``loss`` upsamples the decode and auxiliary logits to the label size and applies the
reference cross-entropy (docs/reference.md §R2.4), the auxiliary head weighted 0.4. Sliding-window and
multi-scale inference live with the evaluator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.backbone_timm import build_backbone
from models.config import FCNConfig, SegmentorConfig, UperNetConfig
from models.heads import FCNHead, UperNetHead
from models.losses import pixel_accuracy, seg_cross_entropy


class EncoderDecoder(nn.Module):
    """ViT-Adapter backbone + UperNet decode head (+ FCN auxiliary head).

    Args:
        config: a zoo entry (possibly with overrides) whose head is ``"upernet"``.

    Attributes:
        backbone: :class:`models.backbone.ViTAdapter` (or :class:`models.backbone_timm.TimmViTAdapter` for a timm trunk).
        decode_head: :class:`UperNetHead`.
        auxiliary_head: :class:`FCNHead` or None.
    """

    def __init__(self, config: SegmentorConfig) -> None:
        super().__init__()
        if not isinstance(config.decode_head, UperNetConfig):
            raise TypeError(f"EncoderDecoder needs an UperNet head, got {type(config.decode_head).__name__}")
        self.config = config
        self.num_classes = config.num_classes
        self.ignore_index = config.ignore_index
        self.backbone = build_backbone(config.backbone)
        channels = [self.backbone.out_channels] * 4
        self.decode_head = UperNetHead(
            in_channels=channels, num_classes=config.num_classes, config=config.decode_head
        )
        aux: FCNConfig | None = config.auxiliary_head
        self.auxiliary_head = (
            FCNHead(in_channels=channels[aux.in_index], num_classes=config.num_classes, config=aux)
            if aux
            else None
        )

    def extract_features(self, img: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) normalised image -> four backbone maps (strides 4, 8, 16, 32)."""
        return self.backbone(img)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised image -> (B, K, H/4, W/4) decode logits."""
        return self.decode_head(self.extract_features(img))

    def predict(self, img: torch.Tensor) -> torch.Tensor:
        """Whole-image inference: (B, 3, H, W) -> (B, K, H, W) logits at input resolution (before softmax)."""
        logits = self(img)
        return F.interpolate(
            logits, size=img.shape[2:], mode="bilinear", align_corners=self.config.align_corners
        )

    def loss(self, img: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training losses.

        Args:
            img: (B, 3, H, W) normalised crops.
            labels: (B, H, W) int64 train ids with ``ignore_index`` (255) for ignored pixels.

        Returns:
            ``decode.loss_seg``, ``aux.loss_seg`` (already weighted), ``decode.acc_seg`` and
            ``loss`` (the sum of the weighted loss terms, to back-propagate).
        """
        if labels.dim() != 3 or labels.shape[0] != img.shape[0] or labels.shape[1:] != img.shape[2:]:
            raise ValueError(f"labels of shape {tuple(labels.shape)} do not match images {tuple(img.shape)}")
        features = self.extract_features(img)
        out: dict[str, torch.Tensor] = {}
        heads: list[tuple[str, nn.Module, float]] = [
            ("decode", self.decode_head, self.config.decode_head.loss_weight)
        ]
        if self.auxiliary_head is not None:
            heads.append(("aux", self.auxiliary_head, self.config.auxiliary_head.loss_weight))
        total = img.new_zeros((), dtype=torch.float32)
        for prefix, head, weight in heads:
            logits = F.interpolate(
                head(features),
                size=labels.shape[1:],
                mode="bilinear",
                align_corners=self.config.align_corners,
            )
            term = weight * seg_cross_entropy(logits, labels, ignore_index=self.ignore_index)
            out[f"{prefix}.loss_seg"] = term
            out[f"{prefix}.acc_seg"] = pixel_accuracy(logits, labels)
            total = total + term
        out["loss"] = total
        return out
