"""Build segmentors from zoo entries; count parameters without allocating them."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from models.config import SegmentorConfig, apply_overrides
from models.segmentor import EncoderDecoder
from models.segmentor_mask2former import EncoderDecoderMask2Former
from models.zoo import get_config


class HeadNotAvailableError(NotImplementedError):
    """Raised when a zoo entry's head is registered but not built yet."""


def build_segmentor(config: SegmentorConfig) -> nn.Module:
    """Instantiate the segmentor described by ``config``.

    Returns:
        :class:`EncoderDecoder` for UperNet entries, :class:`EncoderDecoderMask2Former` for
        Mask2Former entries.

    Raises:
        HeadNotAvailableError: for a head kind no segmentor is registered for.
    """
    if config.head == "upernet":
        return EncoderDecoder(config)
    if config.head == "mask2former":
        return EncoderDecoderMask2Former(config)
    raise HeadNotAvailableError(f"{config.name}: no segmentor is registered for head {config.head!r}")


def create_segmentor(name: str | SegmentorConfig, **overrides: Any) -> nn.Module:
    """Build a zoo entry by name (or from a config), with optional overrides.

    Args:
        name: zoo entry name (``models.list_configs()``), or a :class:`SegmentorConfig`.
        **overrides: see :func:`models.config.apply_overrides`; e.g. a tiny test model:
            ``create_segmentor(name, embed_dim=64, depth=4, num_heads=2, deform_num_heads=2, img_size=64)``.

    Returns:
        The segmentor (an ``nn.Module`` in training mode, float32, on the CPU).
    """
    config = name if isinstance(name, SegmentorConfig) else get_config(name)
    if overrides:
        config = apply_overrides(config, **overrides)
    return build_segmentor(config)


def count_parameters(config: SegmentorConfig) -> int:
    """Number of parameters of the built model, computed on the meta device (no memory, fast)."""
    with torch.device("meta"):
        model = build_segmentor(config)
    return sum(p.numel() for p in model.parameters())
