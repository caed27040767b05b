"""Hungarian matching of Mask2Former queries to ground-truth masks (ViT-Adapter's
``MaskHungarianAssigner`` with ``ClassificationCost``, ``CrossEntropyLossCost`` and ``DiceCost``),
docs/reference.md §R2.4.

Per image and per stage, the costs are computed at ``num_points`` (12544) points drawn uniformly
at random, the same points for every query and every target:

* class: ``-softmax(cls)[gt_label]`` x 2.0;
* mask: mean over the points of the sigmoid binary cross-entropy x 5.0;
* dice: ``1 - (2 * sum(p * t) + 1) / (sum(p) + sum(t) + 1)`` with ``p = sigmoid(mask)`` x 5.0;

and ``scipy.optimize.linear_sum_assignment`` minimises their sum on the CPU. Queries left
unmatched are no-object.

Diverged predictions (NaN or infinite logits) give non-finite costs, which the assignment cannot take: they
are replaced by :data:`NONFINITE_COST` (worse than any real cost), so the match is still made and the loss
terms, computed from the same predictions, come out non-finite; the trainer's check after the step then names
the iteration and the terms (``pipelines.engine.step_guard``) instead of a failure deep in the matcher. The
reference's assigner fails inside scipy instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from models.heads.mask2former.points import point_sample

DICE_EPS = 1.0
# what a non-finite cost entry becomes: far above any real cost (each term is below 10 per weight unit)
NONFINITE_COST = 1e12


def classification_cost(cls_logits: torch.Tensor, gt_labels: torch.Tensor) -> torch.Tensor:
    """(Q, K + 1) logits, (G,) labels -> (Q, G) ``-softmax(cls)[:, gt]``."""
    return -cls_logits.softmax(-1)[:, gt_labels]


def mask_bce_cost(mask_logits: torch.Tensor, gt_masks: torch.Tensor) -> torch.Tensor:
    """(..., Q, P) logits, (..., G, P) targets in [0, 1] -> (..., Q, G) mean binary cross-entropy over the
    points (leading dimensions: images, each with its own queries and targets)."""
    pos = F.binary_cross_entropy_with_logits(mask_logits, torch.ones_like(mask_logits), reduction="none")
    neg = F.binary_cross_entropy_with_logits(mask_logits, torch.zeros_like(mask_logits), reduction="none")
    cost = torch.einsum("...qp,...gp->...qg", pos, gt_masks) + torch.einsum(
        "...qp,...gp->...qg", neg, 1 - gt_masks
    )
    return cost / mask_logits.shape[-1]


def dice_cost(mask_logits: torch.Tensor, gt_masks: torch.Tensor) -> torch.Tensor:
    """(..., Q, P) logits, (..., G, P) targets -> (..., Q, G) naive dice loss (eps 1) of every pair."""
    probs = mask_logits.sigmoid()
    numerator = 2 * torch.einsum("...qp,...gp->...qg", probs, gt_masks)
    denominator = probs.sum(-1)[..., :, None] + gt_masks.sum(-1)[..., None, :]
    return 1 - (numerator + DICE_EPS) / (denominator + DICE_EPS)


class HungarianMatcher:
    """One-to-one assignment of queries to targets by the weighted point costs.

    Args:
        cls_weight: weight of the class cost (2.0).
        mask_weight: weight of the BCE cost (5.0).
        dice_weight: weight of the dice cost (5.0).
        num_points: uniformly sampled points per image (12544).
    """

    def __init__(self, *, cls_weight: float, mask_weight: float, dice_weight: float, num_points: int) -> None:
        self.cls_weight = cls_weight
        self.mask_weight = mask_weight
        self.dice_weight = dice_weight
        self.num_points = num_points

    @torch.no_grad()
    def cost_matrix(
        self,
        cls_logits: torch.Tensor,
        mask_logits: torch.Tensor,
        gt_labels: torch.Tensor,
        gt_masks: torch.Tensor,
        points: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The (Q, G) matching cost of one image.

        Args:
            cls_logits: (Q, K + 1).
            mask_logits: (Q, h, w) mask logits (any resolution).
            gt_labels: (G,) int64 class ids.
            gt_masks: (G, H, W) binary masks (any resolution).
            points: (P, 2) points in [0, 1]; drawn uniformly when None.
        """
        if points is None:
            points = torch.rand(self.num_points, 2, device=mask_logits.device)
        # queries and targets as channels of one map: the same points for all of them
        pred_points = point_sample(mask_logits[None].float(), points[None])[0]  # (Q, P)
        gt_points = point_sample(gt_masks[None].float(), points[None])[0]  # (G, P)
        return (
            self.cls_weight * classification_cost(cls_logits.float(), gt_labels)
            + self.mask_weight * mask_bce_cost(pred_points, gt_points)
            + self.dice_weight * dice_cost(pred_points, gt_points)
        )

    @torch.no_grad()
    def batch_cost_matrices(
        self,
        cls_logits: torch.Tensor,
        mask_logits: torch.Tensor,
        targets: Sequence[tuple[torch.Tensor, torch.Tensor]],
        points: torch.Tensor,
    ) -> torch.Tensor:
        """:meth:`cost_matrix` of several images at once, the targets padded to the most of any image.

        The same cost functions as :meth:`cost_matrix` with the images as a leading dimension; only the three
        sums over the points (and ``sum(p)``) run as one batched product instead of one per image, so their rounding order
        may differ (each sum by at most its length times float32's unit roundoff, relative to its terms).

        Args:
            cls_logits: (N, Q, K + 1).
            mask_logits: (N, Q, h, w).
            targets: N (labels (G_n,), masks (G_n, H, W)); every image has at least one target.
            points: (N, P, 2) in [0, 1], image n's points at ``points[n]``.

        Returns:
            (N, Q, G) with G the most targets of any image; entries ``[n, :, G_n:]`` are padding.
        """
        count, padded = len(targets), max(labels.numel() for labels, _ in targets)
        size = targets[0][1].shape[-2:]
        gt_labels = torch.zeros(count, padded, dtype=torch.int64, device=cls_logits.device)
        gt_masks = torch.zeros(count, padded, *size, device=mask_logits.device)
        for n, (labels, masks) in enumerate(targets):
            gt_labels[n, : labels.numel()] = labels
            gt_masks[n, : labels.numel()] = masks
        # (N, Q, P) and (N, G, P): queries and targets as channels, image n sampled at its own points
        pred_points = point_sample(mask_logits.float(), points)
        gt_points = point_sample(gt_masks, points)
        # (N, Q, K + 1) -> (N, Q, G): -softmax(cls)[gt] of every query and (padded) target
        cls_cost = -torch.gather(
            cls_logits.float().softmax(-1), 2, gt_labels[:, None, :].expand(-1, cls_logits.shape[1], -1)
        )
        return (
            self.cls_weight * cls_cost
            + self.mask_weight * mask_bce_cost(pred_points, gt_points)
            + self.dice_weight * dice_cost(pred_points, gt_points)
        )

    @torch.no_grad()
    def match_batch(
        self,
        cls_logits: torch.Tensor,
        mask_logits: torch.Tensor,
        targets: Sequence[tuple[torch.Tensor, torch.Tensor]],
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Match every image of a batch: what :meth:`__call__` gives image by image, in one pass.

        The points are drawn as the image-by-image calls draw them (``num_points`` per image with targets, in
        image order: one ``torch.rand`` of all of them gives the same numbers on the CPU generator; CUDA's
        generator gives other numbers of the same distribution), and the costs come from
        :meth:`batch_cost_matrices`; the assignment is the same unless two assignments' costs tie to within
        those sums' rounding. One call instead of one per image is what keeps the tiny CPU
        models' steps short (the per-image calls were a tenth of a 16-image step).

        Args:
            cls_logits: (B, Q, K + 1).
            mask_logits: (B, Q, h, w).
            targets: per image (labels (G,), masks (G, H, W)).

        Returns:
            Per image (query indices, target indices) as :meth:`__call__` returns them.
        """
        device = cls_logits.device
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        matches: list[tuple[torch.Tensor, torch.Tensor]] = [(empty, empty)] * len(targets)
        with_targets = [b for b, (labels, _) in enumerate(targets) if labels.numel()]
        if not with_targets:
            return matches
        points = torch.rand(len(with_targets), self.num_points, 2, device=mask_logits.device)
        if len(with_targets) < len(targets):
            index = torch.as_tensor(with_targets, device=device)
            cls_logits, mask_logits = cls_logits[index], mask_logits[index]
        costs = self.batch_cost_matrices(cls_logits, mask_logits, [targets[b] for b in with_targets], points)
        costs = costs.cpu().numpy()
        for n, b in enumerate(with_targets):
            matches[b] = self._assign(costs[n, :, : targets[b][0].numel()], device)
        return matches

    @staticmethod
    def _assign(cost: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The minimal-cost assignment of one (Q, G) cost matrix; non-finite entries count as
        :data:`NONFINITE_COST`."""
        if not np.isfinite(cost).all():
            cost = np.nan_to_num(cost, nan=NONFINITE_COST, posinf=NONFINITE_COST, neginf=NONFINITE_COST)
        rows, cols = linear_sum_assignment(cost)
        return (
            torch.as_tensor(rows, dtype=torch.int64, device=device),
            torch.as_tensor(cols, dtype=torch.int64, device=device),
        )

    @torch.no_grad()
    def __call__(
        self,
        cls_logits: torch.Tensor,
        mask_logits: torch.Tensor,
        gt_labels: torch.Tensor,
        gt_masks: torch.Tensor,
        points: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Match one image.

        Args:
            see :meth:`cost_matrix`.

        Returns:
            (query indices, target indices), int64 on the input device, query indices ascending;
            ``min(Q, G)`` pairs. Non-finite costs (diverged predictions) count as :data:`NONFINITE_COST`.
        """
        device = cls_logits.device
        if gt_labels.numel() == 0:
            empty = torch.zeros(0, dtype=torch.int64, device=device)
            return empty, empty
        cost = self.cost_matrix(cls_logits, mask_logits, gt_labels, gt_masks, points).cpu().numpy()
        return self._assign(cost, device)
