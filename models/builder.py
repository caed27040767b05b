"""Build segmentors from zoo entries; count parameters without allocating them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from models.adapter.ms_deform_attn import MSDeformAttn
from models.config import SegmentorConfig
from models.segmentor import EncoderDecoder
from models.segmentor_mask2former import EncoderDecoderMask2Former
from models.zoo import get_config


def build_segmentor(config: SegmentorConfig) -> nn.Module:
    """Instantiate the segmentor described by ``config``.

    Returns:
        :class:`EncoderDecoder` for UperNet entries, :class:`EncoderDecoderMask2Former` for
        Mask2Former entries, with every deformable attention set to ``config.deform_attn_backend``.
    """
    model = EncoderDecoder(config) if config.head == "upernet" else EncoderDecoderMask2Former(config)
    set_deform_attn_backend(model, config.deform_attn_backend)
    return model


def set_deform_attn_backend(model: nn.Module, backend: str) -> None:
    """Make every multi-scale deformable attention of ``model`` run ``backend`` (``auto``, ``pytorch``, ``triton``)."""
    for module in model.modules():
        if isinstance(module, MSDeformAttn):
            module.backend = backend


def create_segmentor(
    name: str | SegmentorConfig,
    overrides: Mapping[str, Any] | None = None,
    /,
    *,
    preset: str | None = None,
    **more: Any,
) -> nn.Module:
    """Build a zoo entry by name (or from a config), with an optional preset and overrides.

    Args:
        name: zoo entry name (``models.list_configs()``), or a :class:`SegmentorConfig`.
        overrides: ``{dotted path or alias: value}`` (:mod:`models.overrides`), e.g.
            ``{"backbone.trunk.embed_dim": 64, "data.eval.mode": "whole"}``.
        preset: named overrides applied first (``"tiny"``: a CPU-sized model of the same structure).
        **more: overrides as keywords (``embed_dim=64``).

    Returns:
        The segmentor (an ``nn.Module`` in training mode, float32, on the CPU).
    """
    if isinstance(name, SegmentorConfig):
        config = name
        if overrides or more or preset:
            from models.overrides import apply_overrides
            from models.presets import preset_overrides

            config = apply_overrides(
                config, {**preset_overrides(config, preset), **(overrides or {}), **more}
            )
    else:
        config = get_config(name, overrides, preset=preset, **more)
    return build_segmentor(config)


def count_parameters(config: SegmentorConfig) -> int:
    """Number of parameters of the built model, computed on the meta device (no memory, fast)."""
    with torch.device("meta"):
        model = build_segmentor(config)
    return sum(p.numel() for p in model.parameters())
