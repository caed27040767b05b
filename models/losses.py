"""Segmentation losses with the reference's reductions (docs/reference.md §R2.4)."""

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
        Scalar loss: float32 (half-precision logits are cast up, as the reference's ``force_fp32``), float64
        for float64 logits.
    """
    logits = logits if logits.dtype == torch.float64 else logits.float()
    per_pixel = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")
    return per_pixel.mean()


@torch.no_grad()
def pixel_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy in percent over ALL pixels, ignored ones counting as wrong: mmseg 0.20.2's ``accuracy``
    (its ``acc_seg``, docs/reference.md §T1), computed the same way (top-1 index, float sum, times
    ``100 / numel``), so the logged value is the reference's to the digit.

    Args:
        logits: (B, K, H, W).
        labels: (B, H, W) int64 train ids (ignored pixels never equal a class index).

    Returns:
        Scalar accuracy in percent.
    """
    predicted = logits.topk(1, dim=1).indices[:, 0]  # (B, H, W)
    correct = (predicted == labels).reshape(-1).float().sum(0, keepdim=True)
    return correct.mul_(100.0 / labels.numel())[0]
