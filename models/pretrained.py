"""Pretrained trunk weights (DeiT, AugReg, BEiT, BEiTv2) as the reference loads them (docs/reference.md §R2.2).

ViT (DeiT / AugReg, ``my_checkpoint.py``): the state dict is unwrapped (``state_dict``/``model``,
``module.`` stripped) and copied by name into the trunk (timm names equal ours); ``cls_token``,
``norm.*``, ``head.*`` and ``dist_token`` are not used; a shape mismatch is an error (``img_size``
must equal the checkpoint resolution; ``pos_embed`` is resized at every forward, not here);
``gamma1/gamma2`` and the whole adapter keep their initialisation.

BEiT / BEiTv2 (``checkpoint.py``): also ``module``/``encoder.`` unwrapping; a shared
``rel_pos_bias.relative_position_bias_table`` is copied into every block; the
``relative_position_index`` buffers are recomputed, not loaded; each block's table for a 14x14
pretraining grid (27x27 + 3 rows) is resampled to the (2*img/16 - 1)^2 + 3 rows of the model: the
3 cls rows are kept, the grid is fitted per head with a bicubic interpolating spline on
geometrically spaced source offsets (ratio ``q`` by bisection so that the outermost source offset
reaches ``dst // 2``) and evaluated at the integer offsets. The reference used scipy's
``interp2d(kind="cubic")``; on a rectilinear grid that is the same s=0 bicubic spline as
``RectBivariateSpline(kx=3, ky=3, s=0)``, which replaces it here (interp2d is gone from scipy).
Unused keys (``fc_norm``, ``head``, ``norm``, ``lm_head``...) are reported, not loaded.

The timm trunks of the extension entries (DINOv3, DINOv2, EVA-02) load through
:mod:`models.pretrained_timm` (timm's layout, or the authors' converted by timm's own filter).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from scipy.interpolate import RectBivariateSpline
from torch import nn

from models.checkpoint import LoadReport, compare_state_dict, unwrap_state_dict
from models.config import TrunkKind
from models.pretrained_timm import convert_timm_pretrained, load_timm_pretrained_trunk
from models.trunks.timm_trunks import TIMM_TRUNK_KINDS

log = logging.getLogger(__name__)

NUM_CLS_ENTRIES = 3  # cls->token, token->cls, cls->cls rows of a BEiT relative position table
_Q_RANGE = (1.01, 1.5)
_Q_TOLERANCE = 1e-6
VIT_UNUSED_PREFIXES = ("cls_token", "norm.", "fc_norm.", "head.", "head_dist.", "dist_token", "pre_logits.")
BEIT_UNUSED_PREFIXES = ("norm.", "fc_norm.", "head.", "lm_head.", "mask_token", "pos_embed")


def geometric_ratio(src_half: int, dst_half: int) -> float:
    """Ratio q with ``sum_{k<src_half} q**k ~= dst_half``, found by bisection as the reference does."""
    left, right = _Q_RANGE
    while right - left > _Q_TOLERANCE:
        q = (left + right) / 2.0
        if (1.0 - q**src_half) / (1.0 - q) > dst_half:
            right = q
        else:
            left = q
    return q


def resize_relative_position_table(table: torch.Tensor, dst_size: int) -> torch.Tensor:
    """Resample a BEiT relative position bias table to a ``dst_size`` x ``dst_size`` offset grid.

    Args:
        table: (src*src + 3, heads), src = 2*W-1 of the pretraining window.
        dst_size: 2*W'-1 of the model's window.

    Returns:
        (dst*dst + 3, heads) in the dtype of ``table``.
    """
    num_rows, heads = table.shape
    src_size = math.isqrt(num_rows - NUM_CLS_ENTRIES)
    if src_size * src_size != num_rows - NUM_CLS_ENTRIES:
        raise ValueError(f"relative position table of {num_rows} rows is not a square grid plus 3 cls rows")
    if src_size == dst_size:
        return table.clone()
    grid, extra = table[:-NUM_CLS_ENTRIES], table[-NUM_CLS_ENTRIES:]
    q = geometric_ratio(src_size // 2, dst_size // 2)
    offsets = np.cumsum([q**i for i in range(src_size // 2)])  # 1, 1+q, 1+q+q^2, ...
    src_coords = np.concatenate([-offsets[::-1], [0.0], offsets])
    half = dst_size // 2
    dst_coords = np.arange(-half, half + 0.1, 1.0)
    values = grid.float().numpy().reshape(src_size, src_size, heads)  # rows: y offset, cols: x offset
    resized = [
        RectBivariateSpline(src_coords, src_coords, values[:, :, h], kx=3, ky=3, s=0)(dst_coords, dst_coords)
        for h in range(heads)
    ]
    # (heads, dst, dst) -> (dst*dst, heads)
    new_grid = torch.from_numpy(np.stack(resized, axis=-1).reshape(dst_size * dst_size, heads)).to(
        table.dtype
    )
    return torch.cat([new_grid, extra], dim=0)


def _strip(tensors: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in tensors.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def convert_pretrained(
    checkpoint: Mapping[str, Any], backbone: nn.Module, kind: TrunkKind
) -> tuple[dict[str, torch.Tensor], LoadReport, list[str]]:
    """Map a pretrained trunk checkpoint onto ``backbone``'s (ViTAdapter's) parameter names.

    Returns:
        (tensors to load, report of loaded/missing/unexpected/mismatched keys, resized keys).
    """
    if kind in TIMM_TRUNK_KINDS:
        return convert_timm_pretrained(checkpoint, backbone, backbone.config.trunk)
    tensors = unwrap_state_dict(checkpoint)
    target = backbone.state_dict()
    resized: list[str] = []
    if kind == "beit":
        tensors = _strip(tensors, ("encoder.",))
        shared = tensors.pop("rel_pos_bias.relative_position_bias_table", None)
        if shared is not None:
            for i in range(len(backbone.blocks)):
                tensors[f"blocks.{i}.attn.relative_position_bias_table"] = shared
        tensors = {k: v for k, v in tensors.items() if not k.endswith("relative_position_index")}
        for key in list(tensors):
            if key.endswith("relative_position_bias_table") and key in target:
                wanted = target[key].shape[0] - NUM_CLS_ENTRIES
                if tensors[key].shape != target[key].shape:
                    tensors[key] = resize_relative_position_table(tensors[key], math.isqrt(wanted))
                    resized.append(key)
        unused = BEIT_UNUSED_PREFIXES
    else:
        unused = VIT_UNUSED_PREFIXES
    report = compare_state_dict(target, tensors)
    ignorable = [k for k in report.unexpected if k.startswith(unused)]
    report.unexpected = [k for k in report.unexpected if k not in ignorable]
    if kind == "beit":
        # the indices are constructed, never loaded
        report.missing = [k for k in report.missing if not k.endswith("relative_position_index")]
    return {k: tensors[k] for k in report.loaded}, report, resized


def load_pretrained_trunk(
    backbone: nn.Module,
    checkpoint: Mapping[str, Any],
    kind: TrunkKind,
    *,
    source: str | None = None,
) -> tuple[LoadReport, list[str]]:
    """Load pretrained trunk weights into a ViTAdapter backbone as the reference does.

    The timm trunk kinds (``dinov3``, ``dinov2``, ``eva02``) go to
    :func:`models.pretrained_timm.load_timm_pretrained_trunk`.

    Raises:
        ValueError: a ViT checkpoint whose shapes differ from the model (the reference raises too),
            or a checkpoint that loads no trunk weight at all.
    """
    if kind in TIMM_TRUNK_KINDS:
        return load_timm_pretrained_trunk(backbone, checkpoint, source=source)
    tensors, report, resized = convert_pretrained(checkpoint, backbone, kind)
    report.source = source
    if kind == "vit" and report.mismatched:
        raise ValueError(
            "pretrained ViT weights do not fit the model (img_size must equal the checkpoint resolution):\n"
            + report.summary()
        )
    if not report.loaded:
        raise ValueError(
            f"no trunk weight of {source or 'the checkpoint'} matches the backbone:\n{report.summary()}"
        )
    target = backbone.state_dict()
    with torch.no_grad():
        for key, value in tensors.items():
            target[key].copy_(value.to(target[key].dtype))
    log.info("pretrained %s trunk: %s", kind, report.summary())
    return report, resized
