"""Whole-image, sliding-window and multi-scale + flip inference as the reference does it
(docs/reference.md §R2.5, docs/reference.md §P7.7-P7.9).

Sliding windows: ``h_grids = max(h - crop + stride - 1, 0) // stride + 1`` (same for w); window
(i, j) has ``y2 = min(i*stride + crop, h)``, ``y1 = max(y2 - crop, 0)`` (same for x), row-major;
windows are never padded. Every window's output at 1/4 is bilinearly resized to the window, summed
on a zero canvas and divided by the per-pixel count. The averaged map gets ONE bilinear resize to
the original size, then softmax over classes; a flipped pass is flipped back after that. Multi-scale
averages those probabilities over all passes; the prediction is the argmax (ties to the lowest index).

For UperNet the averaged quantity is the logits; for Mask2Former it is the semantic score map, and
the softmax is applied to those scores (the reference's second softmax).

Dtypes as the reference's ``test.py`` under fp16 (docs/reference.md §R2.7): the window outputs, the canvas,
the count, the division and both resizes stay in the dtype the model produced (float16 under fp16 autocast:
mmseg's canvas is ``img.new_zeros`` of the half-precision input); only the softmax runs in float32 (autocast's
float32 list), and so does everything after it. In float32 nothing changes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Window = tuple[int, int, int, int]  # (y1, y2, x1, x2)


def slide_windows(height: int, width: int, crop: tuple[int, int], stride: tuple[int, int]) -> list[Window]:
    """The reference's window grid over a ``height`` x ``width`` image (row-major)."""
    crop_h, crop_w = crop
    stride_h, stride_w = stride
    h_grids = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
    w_grids = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
    windows = []
    for i in range(h_grids):
        for j in range(w_grids):
            y2 = min(i * stride_h + crop_h, height)
            x2 = min(j * stride_w + crop_w, width)
            windows.append((max(y2 - crop_h, 0), y2, max(x2 - crop_w, 0), x2))
    return windows


def slide_inference(
    forward: Callable[[torch.Tensor], torch.Tensor],
    img: torch.Tensor,
    *,
    num_classes: int,
    crop: tuple[int, int],
    stride: tuple[int, int],
    batch_windows: int = 4,
) -> torch.Tensor:
    """Averaged window outputs at the input resolution.

    Args:
        forward: maps (N, 3, h, w) crops to (N, K, h/4, w/4) logits or scores.
        img: (1, 3, H, W) normalised image.
        num_classes: K.
        crop, stride: window size and step.
        batch_windows: windows per forward (all windows have the same size, so they batch).

    Returns:
        (1, K, H, W) in the dtype of the window outputs (float16 under fp16 autocast, as the reference;
        float32 for bfloat16 outputs, which the reference never produced).
    """
    if img.shape[0] != 1:
        raise ValueError(f"slide inference takes one image at a time, got a batch of {img.shape[0]}")
    height, width = img.shape[2:]
    windows = slide_windows(height, width, crop, stride)
    canvas: torch.Tensor | None = None
    count: torch.Tensor | None = None
    for start in range(0, len(windows), batch_windows):
        chunk = windows[start : start + batch_windows]
        crops = torch.cat([img[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in chunk], dim=0)
        out = forward(crops)
        if canvas is None or count is None:  # the outputs' dtype: fp16 under fp16 autocast, as the reference
            dtype = torch.float32 if out.dtype == torch.bfloat16 else out.dtype  # no bf16 reference: float32
            canvas = out.new_zeros((1, num_classes, height, width), dtype=dtype)
            count = out.new_zeros((1, 1, height, width), dtype=dtype)
        out = F.interpolate(out, size=crops.shape[2:], mode="bilinear", align_corners=False)
        for k, (y1, y2, x1, x2) in enumerate(chunk):
            canvas[:, :, y1:y2, x1:x2] += out[k : k + 1]
            count[:, :, y1:y2, x1:x2] += 1
    assert canvas is not None and count is not None  # an image has at least one window
    return canvas / count


def whole_inference(forward: Callable[[torch.Tensor], torch.Tensor], img: torch.Tensor) -> torch.Tensor:
    """The whole image in one forward, resized to the input: (1, K, H, W) in the output's dtype."""
    return F.interpolate(forward(img), size=img.shape[2:], mode="bilinear", align_corners=False)


def to_probabilities(
    scores: torch.Tensor,
    original_size: tuple[int, int],
    *,
    flipped: bool,
    valid_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Steps 8-9 of the reference: (crop padding away), one resize to the original size, softmax, flip back.

    Args:
        scores: (1, K, h, w) averaged logits or Mask2Former scores of one pass, resized in their own dtype.
        original_size: (H, W) of the image as read.
        flipped: the pass ran on the horizontally flipped image.
        valid_size: (h', w') before PadShortSide padding, cropped back first (Mask2Former Aug segmentor).

    Returns:
        (1, K, H, W) class probabilities in the original orientation: float32 (float64 for float64 scores).
    """
    scores = to_original_size(scores, original_size, flipped=flipped, valid_size=valid_size)
    return scores.softmax(dim=1)  # per pixel: the same before or after the flip


def to_original_size(
    scores: torch.Tensor,
    original_size: tuple[int, int],
    *,
    flipped: bool,
    valid_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Step 8 of the reference: (crop padding away), one resize to the original size, flip back.

    Args:
        scores: (1, k, h, w) scores of one pass (any k channels: each is resized on its own).
        original_size, flipped, valid_size: as for :func:`to_probabilities`.

    Returns:
        (1, k, H, W) in the original orientation, float32 (float64 for float64 scores); the resize runs in
        the scores' own dtype, as the reference's.
    """
    if valid_size is not None:
        scores = scores[:, :, : valid_size[0], : valid_size[1]]
    scores = F.interpolate(scores, size=original_size, mode="bilinear", align_corners=False)
    scores = scores if scores.dtype == torch.float64 else scores.float()
    return scores.flip(dims=(3,)) if flipped else scores
