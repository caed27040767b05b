"""Pretrained timm trunks (DINOv3, DINOv2, EVA-02) for :class:`models.backbone_timm.TimmViTAdapter`.

Two layouts load, both with the strict key report of :mod:`models.pretrained`:

* timm's own: a ``timm.create_model(name).state_dict()`` saved with ``torch.save``, or timm's release
  (``model.safetensors`` of ``https://huggingface.co/timm/<name>``). The backbone keeps timm's names for
  its trunk (:class:`models.trunks.timm_trunks.TimmTrunk`), so the names map one to one.
* the trunk authors' releases (DINOv3: ``storage_tokens``, ``ls1.gamma``, ``qkv.bias`` with a
  ``bias_mask``, ``rope_embed.periods``; DINOv2: ``mask_token``, ``register_tokens``, ``w12``/``w3``;
  EVA-02's original names): converted by timm's own checkpoint filter of the family
  (``timm.models.eva.checkpoint_filter_fn`` or ``timm.models.vision_transformer.checkpoint_filter_fn``),
  as ``timm.create_model(name, pretrained=True)`` converts them. On timm's layout the filter renames
  nothing.

As in timm, a ``pos_embed`` of another grid is resampled (bicubic, antialiased) to the grid of the
entry's ``img_size`` and a patch kernel of another size is resampled too; those keys come back as
resized. The classifier parts a trunk checkpoint carries (final ``norm``, ``fc_norm``, ``head``,
``mask_token``) are reported, not loaded; the adapter keeps its initialisation (missing); a trunk
weight that is missing or of another shape is an error naming it.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from models._timm import eva_checkpoint_filter, vit_checkpoint_filter
from models.checkpoint import LoadReport, compare_state_dict, unwrap_state_dict
from models.config import TrunkConfig
from models.trunks.timm_trunks import CHECKPOINT_FILTERS, create_timm_vit

log = logging.getLogger(__name__)

TIMM_UNUSED_PREFIXES = ("norm.", "fc_norm.", "head.", "head_drop.", "attn_pool.", "mask_token", "lm_head.")
# the trunk's parameters in the backbone (timm's top-level names); everything else is the adapter
TRUNK_PREFIXES = ("patch_embed.", "cls_token", "reg_token", "pos_embed", "norm_pre.", "blocks.")
_RESAMPLED_KEYS = ("pos_embed", "patch_embed.proj.weight")


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def convert_timm_pretrained(
    checkpoint: Mapping[str, Any], backbone: nn.Module, trunk: TrunkConfig
) -> tuple[dict[str, torch.Tensor], LoadReport, list[str]]:
    """Map a timm-layout or authors'-layout trunk checkpoint onto ``backbone``'s names.

    Args:
        checkpoint: the loaded file (a state dict, or one under ``state_dict``/``model``/``module``).
        backbone: the :class:`models.backbone_timm.TimmViTAdapter` to load into.
        trunk: its trunk config (family, timm architecture, sizes).

    Returns:
        (tensors to load, report of loaded/missing/unexpected/mismatched keys, resampled keys).
    """
    raw = unwrap_state_dict(checkpoint)
    with torch.device("meta"):
        reference = create_timm_vit(trunk)  # the filter reads the target's shapes only
    convert = eva_checkpoint_filter if CHECKPOINT_FILTERS[trunk.kind] == "eva" else vit_checkpoint_filter
    with contextlib.redirect_stdout(io.StringIO()) as printed:  # the eva filter prints skipped biases
        tensors = convert(dict(raw), reference)
    if printed.getvalue().strip():
        log.debug("timm checkpoint filter: %s", printed.getvalue().strip())
    resized = [
        key
        for key in _RESAMPLED_KEYS
        if key in tensors and key in raw and not _shares_storage(tensors[key], raw[key])
    ]
    report = compare_state_dict(backbone.state_dict(), tensors)
    report.unexpected = [k for k in report.unexpected if not k.startswith(TIMM_UNUSED_PREFIXES)]
    return {k: tensors[k] for k in report.loaded}, report, resized


def load_timm_pretrained_trunk(
    backbone: nn.Module, checkpoint: Mapping[str, Any], *, source: str | None = None
) -> tuple[LoadReport, list[str]]:
    """Load pretrained trunk weights into a :class:`models.backbone_timm.TimmViTAdapter`.

    Returns:
        (the key report, the resampled keys).

    Raises:
        ValueError: a trunk weight is missing or of another shape (wrong family, size or file),
            naming the keys. Unexpected keys are reported, not loaded.
    """
    trunk: TrunkConfig = backbone.config.trunk
    tensors, report, resized = convert_timm_pretrained(checkpoint, backbone, trunk)
    report.source = source
    missing_trunk = [k for k in report.missing if k.startswith(TRUNK_PREFIXES)]
    if missing_trunk or report.mismatched:
        raise ValueError(
            f"pretrained {trunk.kind} weights ({source or 'checkpoint'}) do not fit the "
            f"{trunk.timm_name} trunk of the entry (family, size or layout differ):\n"
            + report.summary()
            + (f"\nmissing trunk weights: {', '.join(missing_trunk)}" if missing_trunk else "")
        )
    target = backbone.state_dict()
    with torch.no_grad():
        for key, value in tensors.items():
            target[key].copy_(value.to(target[key].dtype))
    log.info("pretrained %s trunk: %s", trunk.kind, report.summary())
    return report, resized
