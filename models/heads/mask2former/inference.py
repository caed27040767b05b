"""Mask2Former semantic inference (ViT-Adapter's ``Mask2FormerHead.forward_test``),
docs/reference.md §P4 and docs/reference.md §R2.5.

Only the last stage is used: ``softmax(cls)[..., :-1]`` (the no-object column dropped after the
softmax) times ``sigmoid(mask)``, summed over queries, at the mask resolution (1/4). These scores
are what the slide-window inference averages; the segmentor's softmax comes after.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def semantic_inference(cls_pred: torch.Tensor, mask_pred: torch.Tensor) -> torch.Tensor:
    """Per-class semantic scores.

    Args:
        cls_pred: (B, Q, K + 1) class logits, the last column no-object.
        mask_pred: (B, Q, h, w) mask logits.

    Returns:
        (B, K, h, w) scores ``sum_q softmax(cls_q)[k] * sigmoid(mask_q)``.
    """
    probs = F.softmax(cls_pred, dim=-1)[..., :-1]
    return torch.einsum("bqc,bqhw->bchw", probs, mask_pred.sigmoid())
