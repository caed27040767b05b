"""The predicted label map of one image with memory linear in its pixels, whatever the number of classes.

The reference protocol (:mod:`pipelines.engine.inference`) resizes every view's scores to the original size,
softmaxes and averages them: K x H x W floats per view (150 classes on a 12-megapixel photo: 7 GB each).
:func:`predict_labels` gives the same argmax without them when they would be large:

* while K x H x W x 4 bytes stays under ``dense_limit`` it runs the reference path as it is
  (:func:`pipelines.engine.views.predict_probabilities`), so results on ordinary images are those of
  the evaluation, bit for bit;
* beyond it, the classes are processed in chunks. A bilinear resize treats every class channel on its own,
  so resizing a chunk of channels gives exactly those channels of the full resize. Pass 1 runs an online
  log-sum-exp over the chunks (a running maximum and sum per pixel and view); pass 2 recomputes each chunk,
  turns it into probabilities with those, averages over the views and keeps a running argmax (ties to the
  lowest class index, as ``argmax`` does). Peak memory is about (2 x views + chunk + 4) x H x W floats.

Where even that does not fit, the error names the image size and what helps.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from data.eval_transforms import TestPipeline
from pipelines.engine.inference import to_original_size
from pipelines.engine.views import InferenceSettings, iter_view_scores, predict_probabilities

log = logging.getLogger(__name__)

# K x H x W float32 bytes up to which the reference path runs unchanged (the probabilities are held whole)
DENSE_LIMIT_BYTES = 512 * 2**20
# classes resized at once on the chunked path
CLASS_CHUNK = 8
FLOAT_BYTES = 4


def _resized(
    scores: torch.Tensor, classes: slice, size: tuple[int, int], flipped: bool, valid: tuple[int, int] | None
) -> torch.Tensor:
    """Channels ``classes`` of one view's scores at the original size and orientation: (k, H, W)."""
    return to_original_size(scores[:, classes], size, flipped=flipped, valid_size=valid)[0]


@torch.no_grad()
def predict_labels(
    model: nn.Module,
    image: np.ndarray,
    pipeline: TestPipeline,
    settings: InferenceSettings,
    *,
    num_classes: int,
    device: torch.device,
    dense_limit: int = DENSE_LIMIT_BYTES,
    source: str = "the image",
) -> np.ndarray:
    """The argmax of the view-averaged class probabilities: (H, W) int64.

    Args:
        model, image, pipeline, settings, num_classes, device: as for
            :func:`pipelines.engine.views.predict_probabilities`.
        dense_limit: bytes of K x H x W float32 up to which the probabilities are held whole.
        source: the image's name, for the error message.

    Raises:
        MemoryError: the image does not fit even by chunks, naming its size and what helps.
    """
    height, width = int(image.shape[0]), int(image.shape[1])
    if num_classes * height * width * FLOAT_BYTES <= dense_limit:
        probs = predict_probabilities(
            model, image, pipeline, settings, num_classes=num_classes, device=device
        )
        return probs.argmax(dim=0).numpy()
    try:
        return _chunked_labels(model, image, pipeline, settings, num_classes=num_classes, device=device)
    except (RuntimeError, MemoryError) as err:
        if "memory" not in str(err).lower() and not isinstance(err, MemoryError):
            raise
        raise MemoryError(
            f"{source}: a {width} x {height} image does not fit in memory for {num_classes}-class prediction "
            f"({err}); downscale it (e.g. to at most 2048 pixels on the long side) or use single-scale "
            "inference (--mode ss), which holds one view instead of all"
        ) from None


def _chunked_labels(
    model: nn.Module,
    image: np.ndarray,
    pipeline: TestPipeline,
    settings: InferenceSettings,
    *,
    num_classes: int,
    device: torch.device,
) -> np.ndarray:
    size = (int(image.shape[0]), int(image.shape[1]))
    views = [
        (scores.cpu(), flipped, valid)
        for scores, flipped, valid in iter_view_scores(
            model, image, pipeline, settings, num_classes=num_classes, device=device
        )
    ]
    if not views:
        raise ValueError("the test pipeline produced no view")
    chunks = [slice(k, min(k + CLASS_CHUNK, num_classes)) for k in range(0, num_classes, CLASS_CHUNK)]
    # pass 1: per view, the log-sum-exp over all classes at every pixel (running maximum and sum)
    maxima, sums = [], []
    for scores, flipped, valid in views:
        running_max = torch.full(size, -torch.inf)
        running_sum = torch.zeros(size)
        for classes in chunks:
            chunk = _resized(scores, classes, size, flipped, valid)
            new_max = torch.maximum(running_max, chunk.amax(dim=0))
            running_sum = running_sum * torch.exp(running_max - new_max) + torch.exp(chunk - new_max).sum(
                dim=0
            )
            running_max = new_max
        maxima.append(running_max)
        sums.append(running_sum)
    # pass 2: per chunk, the view-averaged probabilities and a running argmax
    best_value = torch.full(size, -torch.inf)
    best_index = torch.zeros(size, dtype=torch.int64)
    for classes in chunks:
        total = None
        for (scores, flipped, valid), running_max, running_sum in zip(views, maxima, sums, strict=True):
            probs = torch.exp(_resized(scores, classes, size, flipped, valid) - running_max) / running_sum
            total = probs if total is None else total + probs
        assert total is not None  # at least one view
        total /= len(views)
        value, index = total.max(dim=0)  # first maximum within the chunk
        better = value > best_value  # strictly: an equal value in a later chunk keeps the lower index
        best_value = torch.where(better, value, best_value)
        best_index = torch.where(better, index + classes.start, best_index)
    return best_index.numpy()
