"""The one place that imports timm.

timm imports torchvision. The registry's torchvision 0.28.0 wheel is a CUDA build; with the CPU
build of torch 2.13 its C++ operators cannot load, and ``import torchvision`` fails with
``operator torchvision::nms does not exist`` (``docs/reference.md`` §E1). When,
and only when, that exact failure happens on a CPU-only torch, the schemas of ``torchvision::nms``
and ``torchvision::qnms`` are defined in a ``torch.library`` fragment and the import is retried:
timm then works, and torchvision's C++ operators (unused here) raise if called. On a CUDA torch,
or with a working torchvision, nothing is changed.
"""

from __future__ import annotations

import importlib
import sys

import torch

_MISSING_NMS = "operator torchvision::nms does not exist"
_fragment: torch.library.Library | None = None  # kept alive: the schemas live as long as it does


def _import_torchvision() -> None:
    global _fragment
    try:
        importlib.import_module("torchvision")
    except RuntimeError as err:
        if _MISSING_NMS not in str(err) or torch.version.cuda is not None:
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        _fragment = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            _fragment.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        importlib.import_module("torchvision")


_import_torchvision()

from timm import create_model  # noqa: E402
from timm.layers import Attention as VitAttention  # noqa: E402
from timm.layers import DropPath, Mlp, PatchEmbed, resample_abs_pos_embed, trunc_normal_  # noqa: E402
from timm.models.beit import Block as BeitBlock  # noqa: E402
from timm.models.eva import checkpoint_filter_fn as eva_checkpoint_filter  # noqa: E402
from timm.models.vision_transformer import checkpoint_filter_fn as vit_checkpoint_filter  # noqa: E402

__all__ = [
    "BeitBlock",
    "DropPath",
    "Mlp",
    "PatchEmbed",
    "VitAttention",
    "create_model",
    "eva_checkpoint_filter",
    "resample_abs_pos_embed",
    "trunc_normal_",
    "vit_checkpoint_filter",
]
