"""AdamW parameter groups exactly as the reference builds them (docs/reference.md §R2.3).

``LayerDecayOptimizerConstructor`` (every config but AugReg-B): internal depth N = num_layers + 2;
layer id 0 for ``backbone.{cls_token,mask_token,pos_embed,visual_embed}``, ``backbone.patch_embed.*``
and the Mask2Former ``decode_head.{mask_embed,cls_embed,level_embed,query_embed,query_feat}.*``
(and ``backbone.reg_token``, the registers of the extension entries' timm trunks, whose other trunk
parameters carry these same names; their rotary tables are buffers);
``i + 1`` for ``backbone.blocks.<i>.*``; N - 1 for everything else. Group lr = base lr * rate **
(N - layer_id - 1). No weight decay for 1-D parameters and names ending in ``.bias`` (the
reference's exemption of pos_embed/cls_token compares un-prefixed names and never matches, so those
ARE decayed).

``DefaultOptimizerConstructor`` with ``custom_keys`` (AugReg-B): the first key, in the order given
(longest first, then alphabetical), that is a substring of the parameter name sets its lr and
weight-decay multipliers; unmatched parameters keep the base values.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from models.config import OptimizerRecipe

# + backbone.reg_token: the register tokens of the timm trunks (extension entries), with cls_token/pos_embed
LAYER0_NAMES = (
    "backbone.cls_token",
    "backbone.mask_token",
    "backbone.pos_embed",
    "backbone.visual_embed",
    "backbone.reg_token",
)
LAYER0_PREFIXES = (
    "backbone.patch_embed",
    "decode_head.mask_embed",
    "decode_head.cls_embed",
    "decode_head.level_embed",
    "decode_head.query_embed",
    "decode_head.query_feat",
)
BLOCK_PREFIXES = ("backbone.blocks.", "backbone.layers.")


@dataclass(frozen=True)
class GroupSpec:
    """One parameter group: its name, lr/weight-decay and (for layer decay) its layer id and scale."""

    name: str
    lr: float
    weight_decay: float
    lr_scale: float
    layer_id: int | None
    params: tuple[str, ...]


def layer_id_for(name: str, num_max_layer: int) -> int:
    """The reference's layer id of a parameter name (``get_num_layer_for_vit``)."""
    if name in LAYER0_NAMES or name.startswith(LAYER0_PREFIXES):
        return 0
    if name.startswith(BLOCK_PREFIXES):
        return int(name.split(".")[2]) + 1
    return num_max_layer - 1


def _no_decay(name: str, param: torch.Tensor) -> bool:
    return param.ndim == 1 or name.endswith(".bias")


def param_group_specs(
    named_params: Iterable[tuple[str, torch.Tensor]], recipe: OptimizerRecipe
) -> list[GroupSpec]:
    """Group specs of ``named_params`` (official names, e.g. ``backbone.blocks.0.attn.qkv.weight``).

    Parameters with ``requires_grad=False`` are skipped, as in the reference.
    """
    buckets: dict[str, dict] = {}
    if recipe.layer_decay_rate is not None:
        if recipe.num_layers is None:
            raise ValueError("layer-wise decay needs num_layers")
        num_max_layer = recipe.num_layers + 2
        for name, param in named_params:
            if not param.requires_grad:
                continue
            layer = layer_id_for(name, num_max_layer)
            decay = not _no_decay(name, param)
            key = f"layer_{layer}_{'decay' if decay else 'no_decay'}"
            scale = recipe.layer_decay_rate ** (num_max_layer - layer - 1)
            bucket = buckets.setdefault(
                key,
                {
                    "lr": recipe.lr * scale,
                    "weight_decay": recipe.weight_decay if decay else 0.0,
                    "lr_scale": scale,
                    "layer_id": layer,
                    "params": [],
                },
            )
            bucket["params"].append(name)
    else:
        for name, param in named_params:
            if not param.requires_grad:
                continue
            match = next((key for key in recipe.custom_keys if key[0] in name), None)
            lr_mult, decay_mult = (match[1], match[2]) if match else (1.0, 1.0)
            key = f"custom_{match[0]}" if match else "default"
            bucket = buckets.setdefault(
                key,
                {
                    "lr": recipe.lr * lr_mult,
                    "weight_decay": recipe.weight_decay * decay_mult,
                    "lr_scale": lr_mult,
                    "layer_id": None,
                    "params": [],
                },
            )
            bucket["params"].append(name)
    return [
        GroupSpec(
            name=key,
            lr=b["lr"],
            weight_decay=b["weight_decay"],
            lr_scale=b["lr_scale"],
            layer_id=b["layer_id"],
            params=tuple(b["params"]),
        )
        for key, b in buckets.items()
    ]


def build_optimizer(model: nn.Module, recipe: OptimizerRecipe) -> torch.optim.AdamW:
    """AdamW over the reference's parameter groups; each group keeps ``initial_lr`` for the schedule.

    The multi-tensor (``foreach``) implementation, which torch already picks on CUDA: the same element-wise
    arithmetic as the per-tensor loop torch uses on CPU (the updates are bitwise equal), in far fewer calls,
    which on the demo's tiny CPU model took 15 to 42% off the step over five runs (benchmarks/optimizer).
    """
    params = dict(model.named_parameters())
    groups = []
    for spec in param_group_specs(params.items(), recipe):
        groups.append(
            {
                "params": [params[n] for n in spec.params],
                "lr": spec.lr,
                "initial_lr": spec.lr,
                "weight_decay": spec.weight_decay,
                "group_name": spec.name,
            }
        )
    return torch.optim.AdamW(
        groups,
        lr=recipe.lr,
        betas=recipe.betas,
        eps=recipe.eps,
        weight_decay=recipe.weight_decay,
        foreach=True,
    )
