"""Mask2Former training losses (ViT-Adapter's ``Mask2FormerHead.loss``), docs/reference.md §R2.4.

* Targets (the reference's ``ToMask``): per image, one binary mask per class present in the label
  map, ignore pixels (255) excluded (they belong to no mask).
* Every one of the 1 + 9 stage predictions is matched on its own (:class:`HungarianMatcher`) and
  gets the full loss (deep supervision):

  - ``loss_cls``: softmax cross-entropy over all queries, unmatched ones labelled no-object; class
    weights 1.0 and 0.1 for no-object; weighted mean (divided by the sum of the target weights); x 2.0.
  - ``loss_mask``: sigmoid BCE of the matched masks at ``train_num_points`` (12544) importance-sampled
    points (oversample 3, importance 0.75), summed and divided by ``num_masks * num_points``; x 5.0.
  - ``loss_dice``: naive dice (eps 1) on the same points, summed over masks and divided by
    ``num_masks``; x 5.0.

  ``num_masks`` is the number of matched masks of the batch averaged over the processes
  (``torch.distributed`` all-reduce when initialised), at least 1, so that the gradient averaged over
  the processes is (sum of the mask terms) / (masks of the global batch). The count follows from the
  labels alone (:meth:`Mask2FormerCriterion.count_masks`), so a trainer accumulating gradients over
  micro-batches passes the mean count of all micro-batches of the step (``num_masks=``) and one process
  with accumulation equals several processes. When nothing is matched the mask terms are 0 (kept in the
  graph).
* float64 predictions keep float64 (rounding checks); anything else is computed in float32.
* Names as the reference logs them: the last stage ``loss_cls``/``loss_mask``/``loss_dice``, the
  earlier ones ``d0.loss_cls`` ... ``d8.loss_dice``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from models.config import IGNORE_INDEX, Mask2FormerConfig
from models.heads.mask2former.matcher import DICE_EPS, HungarianMatcher
from models.heads.mask2former.points import point_sample, uncertain_point_coords

Target = tuple[torch.Tensor, torch.Tensor]  # (labels (G,), masks (G, H, W) bool)


def semantic_targets(
    labels: torch.Tensor, *, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> list[Target]:
    """The reference's ``ToMask``: the classes present in each label map and one mask each.

    Args:
        labels: (B, H, W) int64 train ids, ``ignore_index`` for ignored pixels.
        num_classes: K; ids must be in [0, K) apart from ``ignore_index``.
        ignore_index: the ignored label (no mask is made for it).

    Returns:
        Per image ``(classes (G,) int64 ascending, masks (G, H, W) bool)``.

    Raises:
        ValueError: a label outside [0, K) that is not ``ignore_index``.
    """
    targets = []
    for label_map in labels:
        classes = torch.unique(label_map)
        classes = classes[classes != ignore_index]
        bad = classes[(classes < 0) | (classes >= num_classes)]
        if bad.numel():
            raise ValueError(
                f"label values {bad.tolist()} are outside [0, {num_classes}) and not ignore_index={ignore_index}"
            )
        # (G, 1, 1) vs (1, H, W) -> (G, H, W)
        targets.append((classes, label_map[None] == classes[:, None, None]))
    return targets


def dice_loss(mask_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N, P) logits, (N, P) targets -> (N,) naive dice loss (eps 1)."""
    probs = mask_logits.sigmoid()
    numerator = 2 * (probs * targets).sum(-1) + DICE_EPS
    denominator = probs.sum(-1) + targets.sum(-1) + DICE_EPS
    return 1 - numerator / denominator


def average_across_processes(value: torch.Tensor) -> torch.Tensor:
    """The mean of ``value`` over the processes of the default group (itself when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value = value / dist.get_world_size()
    return value


class Mask2FormerCriterion:
    """Matching + weighted losses over all stage predictions.

    Args:
        num_classes: K (the class layer has K + 1 outputs).
        config: loss weights, no-object weight and point-sampling settings.
        ignore_index: the ignored label of the label maps.
    """

    def __init__(
        self, *, num_classes: int, config: Mask2FormerConfig, ignore_index: int = IGNORE_INDEX
    ) -> None:
        self.num_classes = num_classes
        self.num_queries = config.num_queries
        self.ignore_index = ignore_index
        self.cls_weight = config.cls_loss_weight
        self.mask_weight = config.mask_loss_weight
        self.dice_weight = config.dice_loss_weight
        self.no_object_weight = config.no_object_weight
        self.num_points = config.train_num_points
        self.oversample_ratio = config.oversample_ratio
        self.importance_sample_ratio = config.importance_sample_ratio
        self.matcher = HungarianMatcher(
            cls_weight=config.cls_loss_weight,
            mask_weight=config.mask_loss_weight,
            dice_weight=config.dice_loss_weight,
            num_points=config.train_num_points,
        )

    def class_weights(self, device: torch.device) -> torch.Tensor:
        """(K + 1,) cross-entropy weights: 1 per class, ``no_object_weight`` for no-object."""
        weights = torch.ones(self.num_classes + 1, device=device)
        weights[-1] = self.no_object_weight
        return weights

    def stage_losses(
        self,
        cls_pred: torch.Tensor,
        mask_pred: torch.Tensor,
        targets: Sequence[Target],
        num_masks: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Weighted ``loss_cls``, ``loss_mask``, ``loss_dice`` of one stage.

        Args:
            cls_pred: (B, Q, K + 1) class logits.
            mask_pred: (B, Q, h, w) mask logits.
            targets: per image (classes (G,), float masks (G, H, W)), see :func:`semantic_targets`.
            num_masks: scalar normaliser of the mask terms (already averaged and clamped).
        """
        dtype = torch.float64 if cls_pred.dtype == torch.float64 else torch.float32
        cls_pred, mask_pred = cls_pred.to(dtype), mask_pred.to(dtype)
        batch, queries = cls_pred.shape[:2]
        class_targets = torch.full(
            (batch, queries), self.num_classes, dtype=torch.int64, device=cls_pred.device
        )
        matches = self.matcher.match_batch(cls_pred.detach(), mask_pred.detach(), targets)
        # the matched (image, query) pairs and their targets, image by image: one index of the batch
        batch_idx = torch.cat([torch.full_like(query_idx, b) for b, (query_idx, _) in enumerate(matches)])
        query_idx = torch.cat([query_idx for query_idx, _ in matches])
        class_targets[batch_idx, query_idx] = torch.cat(
            [gt_labels[gt_idx] for (gt_labels, _), (_, gt_idx) in zip(targets, matches, strict=True)]
        )
        preds = mask_pred[batch_idx, query_idx]  # (N, h, w)
        # weighted mean = sum(w[t] * ce) / sum(w[t]), the reference's avg_factor
        # (B, Q, K + 1) -> (B*Q, K + 1) and (B, Q) -> (B*Q,)
        loss_cls = F.cross_entropy(
            cls_pred.flatten(0, 1),
            class_targets.flatten(),
            weight=self.class_weights(cls_pred.device).to(dtype),
        )
        if preds.shape[0] == 0:
            zero = mask_pred.sum() * 0.0
            return {
                "loss_cls": self.cls_weight * loss_cls,
                "loss_mask": zero,
                "loss_dice": zero,
            }
        masks = torch.cat(
            [gt_masks[gt_idx] for (_, gt_masks), (_, gt_idx) in zip(targets, matches, strict=True)]
        )
        points = uncertain_point_coords(
            preds.unsqueeze(1).detach(),
            num_points=self.num_points,
            oversample_ratio=self.oversample_ratio,
            importance_sample_ratio=self.importance_sample_ratio,
        )  # (N, P, 2)
        with torch.no_grad():
            point_targets = point_sample(masks.unsqueeze(1), points)[:, 0].to(dtype)  # (N, P)
        point_preds = point_sample(preds.unsqueeze(1), points)[:, 0]  # (N, P)
        loss_dice = dice_loss(point_preds, point_targets).sum() / num_masks
        loss_mask = F.binary_cross_entropy_with_logits(point_preds, point_targets, reduction="sum") / (
            num_masks * self.num_points
        )
        return {
            "loss_cls": self.cls_weight * loss_cls,
            "loss_mask": self.mask_weight * loss_mask,
            "loss_dice": self.dice_weight * loss_dice,
        }

    def count_masks(self, labels: torch.Tensor) -> int:
        """The masks the matcher matches in ``labels``, known before the forward.

        Per image min(``num_queries``, classes present other than ``ignore_index``): the reference's
        ``ToMask`` makes one target per such class and the Hungarian assignment matches min(Q, G) of them.

        Args:
            labels: (B, H, W) int64 label maps.
        """
        total = 0
        for label_map in labels:
            classes = torch.unique(label_map)
            total += min(self.num_queries, int((classes != self.ignore_index).sum()))
        return total

    def __call__(
        self,
        cls_preds: Sequence[torch.Tensor],
        mask_preds: Sequence[torch.Tensor],
        labels: torch.Tensor,
        *,
        num_masks: float | torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """All weighted loss terms.

        Args:
            cls_preds: per stage (B, Q, K + 1) class logits, stage 0 first.
            mask_preds: per stage (B, Q, h, w) mask logits.
            labels: (B, H, W) int64 label maps.
            num_masks: the normaliser of the mask terms: the mean over the processes and accumulation
                micro-batches of the step of :meth:`count_masks` (clamped to at least 1 here). None: this
                batch's count averaged over the processes (the reference without accumulation).

        Returns:
            ``loss_cls``, ``loss_mask``, ``loss_dice`` (last stage) and ``d{i}.loss_*`` for the
            earlier stages i = 0 .. S - 2, each already weighted.
        """
        # float masks once: both the matcher and the losses sample them bilinearly
        targets = [
            (classes, masks.float())
            for classes, masks in semantic_targets(
                labels, num_classes=self.num_classes, ignore_index=self.ignore_index
            )
        ]
        device = cls_preds[0].device
        if num_masks is None:
            queries = cls_preds[0].shape[1]
            # every target is matched while there are enough queries: the count is the same at every stage
            matched = sum(min(queries, gt_labels.numel()) for gt_labels, _ in targets)
            num_masks = average_across_processes(torch.tensor(float(matched), device=device))
        num_masks = torch.as_tensor(num_masks, dtype=torch.float32, device=device).clamp(min=1.0)
        losses: dict[str, torch.Tensor] = {}
        last = len(cls_preds) - 1
        for stage, (cls_pred, mask_pred) in enumerate(zip(cls_preds, mask_preds, strict=True)):
            prefix = "" if stage == last else f"d{stage}."
            for name, value in self.stage_losses(cls_pred, mask_pred, targets, num_masks).items():
                losses[prefix + name] = value
        return losses
