"""Segmentation losses with the reference's reductions (recipes.md 2.4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.config import IGNORE_INDEX


def seg_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Softmax cross-entropy summed over the valid pixels and divided by ALL pixels.

    The reference's CrossEntropyLoss (``avg_non_ignore=False``) averages the per-pixel loss over
    every pixel of the batch, ignored pixels included (they contribute 0).

    Args:
        logits: (B, K, H, W), at the label resolution.
        labels: (B, H, W) int64 train ids, ``ignore_index`` for ignored pixels.
        ignore_index: label value excluded from the sum.

    Returns:
        Scalar loss (float32).
    """
    per_pixel = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="none")
    return per_pixel.mean()


@torch.no_grad()
def pixel_accuracy(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Top-1 accuracy in percent over the non-ignored pixels (a training diagnostic)."""
    valid = labels != ignore_index
    correct = (logits.argmax(dim=1) == labels) & valid
    return 100.0 * correct.sum().float() / valid.sum().clamp(min=1).float()
