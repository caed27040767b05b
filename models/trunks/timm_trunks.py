"""Extension trunks built from timm: DINOv3, DINOv2 and EVA-02 under ViT-Adapter (not in the published rows).

The trunk is timm's own model: :func:`create_timm_vit` calls ``timm.create_model`` on the entry's
architecture (``TrunkConfig.timm_name``, e.g. ``vit_large_patch16_dinov3``) with the config's sizes,
and :class:`TimmTrunk` keeps the parts the adapter needs under timm's attribute names
(``patch_embed``, ``cls_token``, ``reg_token``, ``pos_embed``, ``rope``, ``norm_pre``, ``blocks``);
the final ``norm``/``fc_norm``/``head`` are dropped (the adapter takes the block outputs, as the
reference ViT-Adapter has no final norm). A ``timm.create_model(...).state_dict()`` therefore loads
with the names unchanged (:mod:`models.pretrained_timm`).

Families (all built with ``dynamic_img_size=True``, so any grid goes through):

* ``dinov3`` (``vit_*_patch16_dinov3``): patch 16, cls + 4 register tokens, no absolute position
  embedding, DINOv3 rotary embedding (timm's ``RotaryEmbeddingDinoV3``, normalised patch-centre
  coordinates, so one table per grid), layer scale ``gamma_1``/``gamma_2``.
* ``dinov2`` (``vit_*_patch14_dinov2``, ``*_reg4_dinov2``): patch 14, cls (+ 4 registers), learned
  ``pos_embed`` at the 518 pretraining grid (37 x 37), with the cls slot (plain) or patches only
  (registers, ``no_embed_class``), layer scale ``ls1``/``ls2``.
* ``eva02`` (``eva02_*_patch14_448``): patch 14, cls token, learned ``pos_embed`` with its cls slot
  plus rotary embedding (timm's ``RotaryEmbeddingCat``, coordinates scaled to its reference grid),
  SwiGLU MLP with its inner norm, no layer scale.

How the trunk meets the adapter (:mod:`models.backbone_timm`):

* Only the patch tokens go through the Injector/Extractor; the prefix tokens (cls, registers) are
  put in front of them for every block and split off after (timm's token order), untouched by the
  adapter.
* Position embeddings are applied as timm applies them at any size: the learned ``pos_embed`` is
  resampled from the pretraining grid to the current grid with timm's ``resample_abs_pos_embed``
  (bicubic, antialiased; identity at the pretraining grid) on every forward; the rotary tables are
  built for the current grid (``rope.get_embed(shape=grid)``) and passed to every block, which
  rotates q/k of the patch tokens only.
* The trunk's input: the image itself when its sides are multiples of the patch size (always the
  case for patch 16 and the 32-multiple inputs the adapter takes), otherwise the image bilinearly
  resized to the nearest multiples (512 -> 518 for patch 14: the 37 x 37 DINOv2 pretraining grid).
  Resizing (not cropping or padding) keeps the token grid spanning exactly the image, so the
  deformable attention's normalised coordinates of token and adapter cells agree exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from models._timm import create_model, resample_abs_pos_embed
from models.config import TrunkConfig

# timm's conversion of each family's released checkpoint layouts: timm.models.eva (DINOv3, EVA-02) or
# timm.models.vision_transformer (DINOv2); the identity on timm's own layout
CHECKPOINT_FILTERS: dict[str, str] = {"dinov3": "eva", "dinov2": "vit", "eva02": "eva"}
TIMM_TRUNK_KINDS = frozenset(CHECKPOINT_FILTERS)


def check_timm_trunk(trunk: TrunkConfig) -> None:
    """Raise ValueError unless ``trunk`` is a timm family (``trunk.kind``) naming its architecture (``timm_name``)."""
    if trunk.kind not in TIMM_TRUNK_KINDS:
        raise ValueError(
            f"trunk kind {trunk.kind!r} is not built from timm (timm kinds: {sorted(TIMM_TRUNK_KINDS)})"
        )
    if not trunk.timm_name:
        raise ValueError(f"a {trunk.kind} trunk needs backbone.trunk.timm_name (the timm architecture)")


def timm_model_kwargs(trunk: TrunkConfig) -> dict[str, Any]:
    """The ``timm.create_model`` keyword arguments of ``trunk``: its sizes, no weights, no head.

    ``layer_scale_init`` 0 switches layer scale off (EVA-02), any other value is its init (DINOv2/v3: 1e-5).
    """
    check_timm_trunk(trunk)
    return {
        "pretrained": False,
        "num_classes": 0,
        "dynamic_img_size": True,
        "img_size": trunk.img_size,
        "patch_size": trunk.patch_size,
        "embed_dim": trunk.embed_dim,
        "depth": trunk.depth,
        "num_heads": trunk.num_heads,
        "mlp_ratio": trunk.mlp_ratio,
        "qkv_bias": trunk.qkv_bias,
        "drop_path_rate": trunk.drop_path_rate,
        "init_values": trunk.layer_scale_init if trunk.layer_scale_init > 0 else None,
    }


def create_timm_vit(trunk: TrunkConfig) -> nn.Module:
    """timm's whole model for ``trunk`` (randomly initialised by timm), e.g. to convert checkpoints against."""
    return create_model(trunk.timm_name, **timm_model_kwargs(trunk))


class TrunkTokens(NamedTuple):
    """The embedded input of a timm trunk.

    Attributes:
        patches: (B, h*w, C) patch tokens, position embedding added.
        prefix: (B, P, C) cls and register tokens (with their position embedding where the trunk has one).
        grid: (h, w) patch grid.
        rope: (h*w, 2*D) rotary sin/cos table of the grid (D = rotary dims per head), or None.
    """

    patches: torch.Tensor
    prefix: torch.Tensor
    grid: tuple[int, int]
    rope: torch.Tensor | None


def _nearest_multiple_count(size: int, patch: int) -> int:
    return max(1, math.floor(size / patch + 0.5))


class TimmTrunk(nn.Module):
    """A timm ViT's embedding, prefix tokens, position embeddings and blocks, under timm's names.

    Args:
        trunk: a ``dinov3``/``dinov2``/``eva02`` trunk config with ``timm_name``.

    Attributes:
        patch_size: p.
        num_prefix_tokens: P, cls plus registers.
    """

    def __init__(self, trunk: TrunkConfig) -> None:
        super().__init__()
        vit = create_timm_vit(trunk)
        self.patch_size = trunk.patch_size
        self.num_prefix_tokens: int = vit.num_prefix_tokens
        self.no_embed_class: bool = vit.no_embed_class
        self.patch_embed = vit.patch_embed
        self.cls_token = vit.cls_token
        self.reg_token = vit.reg_token
        self.pos_embed = vit.pos_embed
        self.rope = getattr(vit, "rope", None)
        self.norm_pre = vit.norm_pre
        self.blocks = vit.blocks
        if self.cls_token is None:
            raise ValueError(f"{trunk.timm_name}: the timm trunks of ViT-Adapter have a cls token")

    def trunk_grid(self, height: int, width: int) -> tuple[int, int]:
        """The (h, w) patch grid of an (height, width) image: the nearest number of whole patches."""
        return _nearest_multiple_count(height, self.patch_size), _nearest_multiple_count(
            width, self.patch_size
        )

    def trunk_input(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 3, h*p, w*p): as is, or bilinearly resized when p does not divide H or W."""
        grid_h, grid_w = self.trunk_grid(*x.shape[-2:])
        size = (grid_h * self.patch_size, grid_w * self.patch_size)
        if tuple(x.shape[-2:]) == size:
            return x
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    def embed(self, x: torch.Tensor) -> TrunkTokens:
        """Patch-embed a (B, 3, h*p, w*p) trunk input and add the position embeddings as timm does."""
        tokens = self.patch_embed(x)  # (B, h, w, C): timm's NHWC output with dynamic_img_size
        batch, grid_h, grid_w, dim = tokens.shape
        tokens = tokens.reshape(batch, grid_h * grid_w, dim)  # (B, h, w, C) -> (B, h*w, C)
        parts = [self.cls_token] + ([self.reg_token] if self.reg_token is not None else [])
        prefix = torch.cat(parts, dim=1).expand(batch, -1, -1)  # (B, P, C)
        if self.pos_embed is not None:
            embedded_prefix = 0 if self.no_embed_class else self.num_prefix_tokens
            pos = resample_abs_pos_embed(
                self.pos_embed,
                new_size=(grid_h, grid_w),
                old_size=self.patch_embed.grid_size,
                num_prefix_tokens=embedded_prefix,
            )  # (1, P' + h*w, C), P' = 0 or P
            if embedded_prefix:
                prefix = prefix + pos[:, :embedded_prefix]
            tokens = tokens + pos[:, embedded_prefix:]
        rope = self.rope.get_embed(shape=(grid_h, grid_w)) if self.rope is not None else None
        return TrunkTokens(self.norm_pre(tokens), self.norm_pre(prefix), (grid_h, grid_w), rope)

    def block_fns(self, rope: torch.Tensor | None) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        """Every block as a (B, P + N, C) -> (B, P + N, C) callable, the rotary table bound where there is one."""
        if rope is None:
            return list(self.blocks)
        return [partial(block, rope=rope) for block in self.blocks]

    def forward_trunk(self, x: torch.Tensor) -> torch.Tensor:
        """The trunk alone (no adapter): (B, 3, h*p, w*p) -> (B, h*w, C) patch tokens after the last block."""
        tokens = self.embed(x)
        sequence = torch.cat([tokens.prefix, tokens.patches], dim=1)  # (B, P + h*w, C)
        for block in self.block_fns(tokens.rope):
            sequence = block(sequence)
        return sequence[:, self.num_prefix_tokens :]
