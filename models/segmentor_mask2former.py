"""Encoder-decoder segmentor with a Mask2Former head (ViT-Adapter's ``EncoderDecoderMask2Former``),
docs/reference.md §P4 and docs/reference.md §R2.4-R2.5.

The same interface as :class:`models.segmentor.EncoderDecoder`:

* ``forward(img)``: the per-class semantic scores ``sum_q softmax(cls_q)[:K] * sigmoid(mask_q)`` of
  the last stage at 1/4 resolution, the quantity the sliding-window inference averages;
* ``predict(img)``: those scores bilinearly resized (``align_corners=False``) to the input, before
  the segmentor's softmax (the reference's ``encode_decode``);
* ``loss(img, labels)``: the matching losses of all 10 stage predictions, from the label maps.

The segmentor's softmax over classes, the sliding windows and multi-scale averaging live with the
evaluator. There is no auxiliary head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.backbone_timm import build_backbone
from models.config import Mask2FormerConfig, SegmentorConfig
from models.heads.mask2former import Mask2FormerCriterion, Mask2FormerHead, semantic_inference

LOSS_PREFIX = "decode."


class EncoderDecoderMask2Former(nn.Module):
    """ViT-Adapter backbone + Mask2Former decode head.

    Args:
        config: a zoo entry (possibly with overrides) whose head is ``"mask2former"``.

    Attributes:
        backbone: :class:`models.backbone.ViTAdapter` (or :class:`models.backbone_timm.TimmViTAdapter` for a timm trunk).
        decode_head: :class:`Mask2FormerHead`.
        auxiliary_head: None (Mask2Former configs have none).
        criterion: :class:`Mask2FormerCriterion` (no parameters).
    """

    def __init__(self, config: SegmentorConfig) -> None:
        super().__init__()
        if not isinstance(config.decode_head, Mask2FormerConfig):
            raise TypeError(
                f"EncoderDecoderMask2Former needs a Mask2Former head, got {type(config.decode_head).__name__}"
            )
        self.config = config
        self.num_classes = config.num_classes
        self.ignore_index = config.ignore_index
        self.backbone = build_backbone(config.backbone)
        self.decode_head = Mask2FormerHead(
            in_channels=[self.backbone.out_channels] * len(self.backbone.out_strides),
            strides=self.backbone.out_strides,
            num_classes=config.num_classes,
            config=config.decode_head,
        )
        self.auxiliary_head = None
        self.criterion = Mask2FormerCriterion(
            num_classes=config.num_classes, config=config.decode_head, ignore_index=config.ignore_index
        )

    def extract_features(self, img: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) normalised image -> four backbone maps (strides 4, 8, 16, 32)."""
        return self.backbone(img)

    def forward_stages(self, img: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(B, 3, H, W) -> per-stage class logits (B, Q, K + 1) and mask logits (B, Q, H/4, W/4)."""
        return self.decode_head(self.extract_features(img))

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised image -> (B, K, H/4, W/4) semantic scores (not logits)."""
        cls_preds, mask_preds = self.forward_stages(img)
        return semantic_inference(cls_preds[-1], mask_preds[-1])

    def predict(self, img: torch.Tensor) -> torch.Tensor:
        """Whole-image inference: (B, 3, H, W) -> (B, K, H, W) scores at input resolution (before softmax)."""
        return F.interpolate(
            self(img), size=img.shape[2:], mode="bilinear", align_corners=self.config.align_corners
        )

    def count_masks(self, labels: torch.Tensor) -> int:
        """The matched masks of ``labels`` (B, H, W): what the mask terms are normalised by
        (:meth:`Mask2FormerCriterion.count_masks`); a trainer sums it over the micro-batches of a step."""
        return self.criterion.count_masks(labels)

    def loss(
        self, img: torch.Tensor, labels: torch.Tensor, *, num_masks: float | torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Training losses.

        Args:
            img: (B, 3, H, W) normalised crops.
            labels: (B, H, W) int64 train ids with ``ignore_index`` (255) for ignored pixels.
            num_masks: normaliser of the mask and dice terms (the step's matched masks per process and
                micro-batch, see :meth:`count_masks`); None: this batch's, averaged over the processes.

        Returns:
            ``decode.loss_cls``, ``decode.loss_mask``, ``decode.loss_dice`` (last stage),
            ``decode.d{i}.loss_*`` (stages 0-8), all weighted, and ``loss`` (their sum, to
            back-propagate).

        Raises:
            ValueError: labels of the wrong shape or with ids outside [0, K) other than 255.
        """
        if labels.dim() != 3 or labels.shape[0] != img.shape[0] or labels.shape[1:] != img.shape[2:]:
            raise ValueError(f"labels of shape {tuple(labels.shape)} do not match images {tuple(img.shape)}")
        cls_preds, mask_preds = self.forward_stages(img)
        terms = self.criterion(cls_preds, mask_preds, labels, num_masks=num_masks)
        out = {LOSS_PREFIX + name: value for name, value in terms.items()}
        out["loss"] = torch.stack(list(terms.values())).sum()
        return out
