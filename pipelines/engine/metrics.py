"""Segmentation metrics with mmsegmentation 0.20's definition (docs/reference.md §R2.5, docs/reference.md §P7).

Per image, ``intersect_and_union`` counts, per class, the intersection, the prediction area, the
label area and the union over the pixels whose label is not ``ignore_index``; a label value
``>= num_classes`` (other than ``ignore_index``) drops out of the label area while its prediction
still counts in the prediction area and the union. Counts are accumulated over the whole set
(and summed across ranks); then ``IoU_c = I_c / U_c``, ``Acc_c = I_c / label_c``,
``mIoU = nanmean(IoU)`` (classes with an empty union are skipped), ``mAcc = nanmean(Acc)``,
``aAcc = sum I / sum label``. Reported in percent.

The class confusion matrix (label x prediction pixel counts) is accumulated in the same update; its
diagonal, row sums and column sums are the intersection, label and prediction areas whenever every
non-ignored label is a class id, so the mIoU computed from it is the reported one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from models.config import IGNORE_INDEX


def intersect_and_union(
    pred: np.ndarray, label: np.ndarray, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-class (intersection, union, prediction area, label area) of one image.

    Args:
        pred: (H, W) predicted train ids.
        label: (H, W) ground-truth train ids with ``ignore_index``.
        num_classes: K.

    Returns:
        Four (K,) int64 arrays.
    """
    if pred.shape != label.shape:
        raise ValueError(f"prediction {pred.shape} and label {label.shape} differ in size")
    valid = label != ignore_index
    pred = pred[valid].astype(np.int64)
    label = label[valid].astype(np.int64)
    hit = pred[pred == label]

    def count(values: np.ndarray) -> np.ndarray:
        values = values[(values >= 0) & (values < num_classes)]
        return np.bincount(values, minlength=num_classes)[:num_classes].astype(np.int64)

    area_intersect, area_pred, area_label = count(hit), count(pred), count(label)
    return area_intersect, area_pred + area_label - area_intersect, area_pred, area_label


def confusion_matrix(
    pred: np.ndarray, label: np.ndarray, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> np.ndarray:
    """Class confusion of one image: ``[i, j]`` counts the pixels labelled ``i`` and predicted ``j``.

    Pixels labelled ``ignore_index``, and labels or predictions outside ``[0, K)``, are not counted.

    Args:
        pred: (H, W) predicted train ids.
        label: (H, W) ground-truth train ids with ``ignore_index``.
        num_classes: K.

    Returns:
        (K, K) int64, rows the label, columns the prediction.
    """
    if pred.shape != label.shape:
        raise ValueError(f"prediction {pred.shape} and label {label.shape} differ in size")
    pred = pred.reshape(-1).astype(np.int64)
    label = label.reshape(-1).astype(np.int64)
    keep = (label != ignore_index) & (label >= 0) & (label < num_classes) & (pred >= 0) & (pred < num_classes)
    flat = label[keep] * num_classes + pred[keep]
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_from_confusion(confusion: np.ndarray) -> np.ndarray:
    """Per-class IoU (fraction, NaN for an empty union) of a (K, K) confusion matrix: diagonal over row sum +
    column sum - diagonal. Equals :meth:`SegMetrics.compute`'s IoU whenever every non-ignored label is a
    class id (the readers guarantee it: labels are train ids or ``ignore_index``)."""
    confusion = confusion.astype(np.float64)
    hit = np.diag(confusion)
    with np.errstate(divide="ignore", invalid="ignore"):
        return hit / (confusion.sum(axis=0) + confusion.sum(axis=1) - hit)


@dataclass
class SegMetrics:
    """Accumulator of per-class areas, and of the class confusion matrix, over a dataset.

    Attributes:
        num_classes: K.
        class_names: optional names for the per-class table.
        totals: (4, K) intersection, union, prediction and label areas.
        confusion: (K, K) pixels labelled ``i`` (row) and predicted ``j`` (column).
    """

    num_classes: int
    class_names: tuple[str, ...] | None = None
    ignore_index: int = IGNORE_INDEX
    totals: np.ndarray = field(init=False)
    confusion: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        # rows: intersection, union, prediction, label
        self.totals = np.zeros((4, self.num_classes), dtype=np.int64)
        self.confusion = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        self.images = 0

    def update(self, pred: np.ndarray, label: np.ndarray) -> None:
        """Add one image's counts (areas and confusion, in the same pass over the image)."""
        self.totals += np.stack(intersect_and_union(pred, label, self.num_classes, self.ignore_index))
        self.confusion += confusion_matrix(pred, label, self.num_classes, self.ignore_index)
        self.images += 1

    def all_reduce(self) -> None:
        """Sum the counts over all ranks (no-op unless torch.distributed is initialised)."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        counts = np.concatenate([self.totals.reshape(-1), self.confusion.reshape(-1), [self.images]])
        tensor = torch.from_numpy(counts).double()
        if dist.get_backend() == "nccl":
            tensor = tensor.cuda()
        dist.all_reduce(tensor)
        values = tensor.cpu().numpy().round().astype(np.int64)
        split = 4 * self.num_classes
        self.totals = values[:split].reshape(4, self.num_classes)
        self.confusion = values[split:-1].reshape(self.num_classes, self.num_classes)
        self.images = int(values[-1])

    def compute(self) -> dict:
        """``aAcc``, ``mIoU``, ``mAcc`` (percent), the per-class ``IoU``/``Acc`` lists (NaN as None) and the
        ``confusion`` matrix ((K, K) int64 array, rows the label)."""
        intersect, union, _, label = self.totals.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = intersect / union
            acc = intersect / label
        total_label = label.sum()
        names = self.class_names or tuple(str(i) for i in range(self.num_classes))

        def percent(values: np.ndarray) -> list[float | None]:
            return [None if np.isnan(v) else float(100.0 * v) for v in values]

        return {
            "aAcc": float(100.0 * intersect.sum() / total_label) if total_label else float("nan"),
            "mIoU": float(100.0 * np.nanmean(iou)) if not np.isnan(iou).all() else float("nan"),
            "mAcc": float(100.0 * np.nanmean(acc)) if not np.isnan(acc).all() else float("nan"),
            "num_images": self.images,
            "per_class": {"name": list(names), "IoU": percent(iou), "Acc": percent(acc)},
            "confusion": self.confusion.copy(),
        }
