"""TF32 on CUDA as the reference ran (docs/reference.md §R2.7).

The reference trained and tested with PyTorch 1.x on Ampere-class GPUs, where convolutions
(``torch.backends.cudnn.allow_tf32``, on by default in every PyTorch release) and matrix products
(``torch.backends.cuda.matmul.allow_tf32``, on by default up to PyTorch 1.11) run in TF32. PyTorch 2.x
turns the matmul default off, so training and evaluation set both flags explicitly from the run's ``tf32``
knob (on by default) and record the setting. On the CPU the flags change nothing, but the setting is still
recorded, so a run says what it would have done on a GPU.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def apply_tf32(enabled: bool, device: torch.device | None = None) -> dict[str, bool]:
    """Set cuDNN's and cuBLAS's TF32 switches for this process.

    Args:
        enabled: TF32 on (the reference's) or off (full float32 products).
        device: where the run computes; on a non-CUDA device the flags are set all the same (a no-op there).

    Returns:
        What a run records: ``tf32`` (the setting) and ``tf32_effective`` (whether it acts: a CUDA device).
    """
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    effective = enabled and device is not None and device.type == "cuda"
    log.debug("TF32 %s (%s)", "on" if enabled else "off", "in effect" if effective else "no effect here")
    return {"tf32": enabled, "tf32_effective": effective}
