"""ViT-Adapter networks: typed configs and the zoo (torch-free), trunks, adapter, heads, segmentor,
official-checkpoint conversion.

``models.list_configs`` and ``models.get_config`` do not import torch; the other names are
imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from models.zoo import get_config, list_configs

_LAZY = {
    "create_segmentor": "models.builder",
    "build_segmentor": "models.builder",
    "count_parameters": "models.builder",
    "set_deform_attn_backend": "models.builder",
    "load_official_state_dict": "models.checkpoint",
    "export_official_state_dict": "models.checkpoint",
    "load_checkpoint_file": "models.checkpoint",
    "load_stage_checkpoint": "models.checkpoint",
    "EncoderDecoderMask2Former": "models.segmentor_mask2former",
    "EncoderDecoder": "models.segmentor",
    "ViTAdapter": "models.backbone",
}

__all__ = ["get_config", "list_configs", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
