"""ViT-Adapter around a timm trunk (DINOv3, DINOv2, EVA-02): an extension beyond the published rows.

The adapter is the reference's (:mod:`models.adapter`, as in :class:`models.backbone.ViTAdapter`):
spatial priors + ``level_embed`` at 1/8, 1/16, 1/32, four Injector -> blocks -> Extractor
interactions (two extra Extractors in the last), ``c1 = up(c2) + spm.c1``, the ViT output of
interaction i added to output map i, one BatchNorm per map. The trunk (:mod:`models.trunks.timm_trunks`)
runs its prefix tokens (cls, registers) through the blocks with the patch tokens, and only the
patch tokens meet the adapter.

The trunk's token grid (h, w) need not be the adapter's 1/16 grid: for patch 14 it is ``H/14``
(e.g. 37 x 37 at 512, the input resized to 518 for the trunk). It is tied to the 1/8, 1/16, 1/32
pyramid in two places:

* the deformable attention, through normalised coordinates: the Injector's queries are the trunk
  tokens with their cell centres ``((j + 0.5) / w, (i + 0.5) / h)`` as reference points, sampling
  the three adapter levels; the Extractor samples the trunk tokens as one (h, w) level from the
  adapter cells' centres. Both grids span the whole image, so a normalised point means the same
  image location in both, and bilinear sampling needs no common grid. The ConvFFN keeps splitting
  the adapter tokens by the adapter's own 1/16 grid.
* where the ViT features are added to the output maps: each (h, w) map is resampled bilinearly
  (``align_corners=False``) to the size of its pyramid level (H/4, H/8, H/16, H/32). Resampling by
  ``size`` gives any grid the pyramid's exact shape; for patch 16 on 32-multiple inputs it equals the
  reference's x4 / x2 / x1 / x0.5 ``scale_factor`` resizes (even sizes), so nothing changes there.

Parameter names: the trunk's are timm's at the top level (``patch_embed.*``, ``cls_token``,
``reg_token``, ``pos_embed``, ``blocks.<i>.*``), the adapter's are the reference's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.adapter import SpatialPriorModule
from models.adapter.deform_inputs import ADAPTER_STRIDES, DeformInputs, cell_centres
from models.backbone import OUTPUT_STRIDES, SIZE_DIVISOR, ViTAdapter, build_interactions, reference_init
from models.config import BackboneConfig
from models.trunks.timm_trunks import TIMM_TRUNK_KINDS, TimmTrunk

ADAPTER_GRID_STRIDE = 16  # the ConvFFN's middle level


def trunk_deform_inputs(
    height: int, width: int, grid: tuple[int, int], device: torch.device | None = None
) -> tuple[DeformInputs, DeformInputs]:
    """Injector and Extractor inputs for an image of ``height`` x ``width`` and a trunk grid (h, w).

    Injector: reference points at the (h, w) cell centres, the 1/8, 1/16, 1/32 levels attended.
    Extractor: reference points at the centres of the three adapter levels, the (h, w) grid attended.
    For a (H/16, W/16) grid these are :func:`models.adapter.deform_inputs.deform_inputs`.
    """
    adapter_shapes = [(height // s, width // s) for s in ADAPTER_STRIDES]
    injector = DeformInputs(cell_centres([grid], device), adapter_shapes)
    extractor = DeformInputs(cell_centres(adapter_shapes, device), [grid])
    return injector, extractor


class TimmViTAdapter(TimmTrunk):
    """ViT-Adapter over a timm trunk, returning four maps at strides 4, 8, 16, 32.

    Args:
        config: a ``dinov3``/``dinov2``/``eva02`` trunk, the adapter and checkpointing settings.

    Attributes:
        out_channels: channels of each output (= trunk width).
        out_strides: (4, 8, 16, 32).
    """

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__(config.trunk)
        trunk, adapter = config.trunk, config.adapter
        dim = trunk.embed_dim
        self.config = config
        self.out_channels = dim
        self.out_strides = OUTPUT_STRIDES
        self.interaction_indexes = adapter.interaction_indexes
        self.with_cp = config.with_cp
        self.level_embed = nn.Parameter(torch.zeros(3, dim))
        self.spm = SpatialPriorModule(inplanes=adapter.conv_inplane, embed_dim=dim)
        self.interactions = build_interactions(config)
        self.add_vit_feature = adapter.add_vit_feature
        self.up = nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2)
        self.norm1 = nn.BatchNorm2d(dim)
        self.norm2 = nn.BatchNorm2d(dim)
        self.norm3 = nn.BatchNorm2d(dim)
        self.norm4 = nn.BatchNorm2d(dim)
        if self.level_embed.device.type != "meta":  # shapes only (parameter counting): nothing to initialise
            self.init_adapter_weights()

    def adapter_modules(self) -> list[nn.Module]:
        """The modules around the trunk (the trunk keeps timm's initialisation or its pretrained weights)."""
        return [self.spm, self.interactions, self.up, self.norm1, self.norm2, self.norm3, self.norm4]

    @torch.no_grad()
    def init_adapter_weights(self) -> None:
        """The reference's adapter initialisation (as :meth:`models.backbone.ViTAdapter.init_weights`).

        Linear trunc_normal(0.02) / bias 0; norms 1/0; Conv and ConvTranspose normal(0, sqrt(2/fan_out));
        every MSDeformAttn re-initialised by its own rule; ``level_embed`` normal(0, 1).
        """
        reference_init([m for part in self.adapter_modules() for m in part.modules()])
        nn.init.normal_(self.level_embed)

    def check_input_size(self, height: int, width: int) -> None:
        """Raise ValueError if (height, width) cannot go through the adapter (multiples of 32)."""
        if height % SIZE_DIVISOR or width % SIZE_DIVISOR:
            raise ValueError(
                f"input size {height}x{width} is not a multiple of {SIZE_DIVISOR} in height and width "
                "(ViT-Adapter needs it; the test pipeline's ResizeToMultiple(32) guarantees it)"
            )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) image -> four (B, C, H/s, W/s) maps for s = 4, 8, 16, 32."""
        height, width = x.shape[-2:]
        self.check_input_size(height, width)
        tokens = self.embed(self.trunk_input(x))
        grid_h, grid_w = tokens.grid
        injector_inputs, extractor_inputs = trunk_deform_inputs(height, width, tokens.grid, x.device)

        priors = self.spm(x)
        c2 = priors.c2 + self.level_embed[0]
        c3 = priors.c3 + self.level_embed[1]
        c4 = priors.c4 + self.level_embed[2]
        c = torch.cat([c2, c3, c4], dim=1)  # (B, S, C) with S = HW/64 + HW/256 + HW/1024

        patches, prefix = tokens.patches, tokens.prefix
        batch, _, dim = patches.shape
        blocks = self.block_fns(tokens.rope)
        adapter_h, adapter_w = height // ADAPTER_GRID_STRIDE, width // ADAPTER_GRID_STRIDE
        vit_maps = []
        for interaction, (first, last) in zip(self.interactions, self.interaction_indexes, strict=True):
            patches, c, prefix = interaction(
                patches,
                c,
                prefix,
                blocks[first : last + 1],
                injector_inputs,
                extractor_inputs,
                adapter_h,
                adapter_w,
            )
            # (B, h*w, C) -> (B, C, h*w) -> (B, C, h, w)
            vit_maps.append(patches.transpose(1, 2).reshape(batch, dim, grid_h, grid_w))

        # split the adapter tokens back into the 1/8, 1/16, 1/32 maps
        n2, n3 = c2.shape[1], c3.shape[1]
        # (B, n, C) -> (B, C, n) -> (B, C, h', w')
        f2 = c[:, :n2].transpose(1, 2).reshape(batch, dim, 2 * adapter_h, 2 * adapter_w)
        f3 = c[:, n2 : n2 + n3].transpose(1, 2).reshape(batch, dim, adapter_h, adapter_w)
        f4 = c[:, n2 + n3 :].transpose(1, 2).reshape(batch, dim, adapter_h // 2, adapter_w // 2)
        f1 = self.up(f2) + priors.c1
        outs = [f1, f2, f3, f4]
        if self.add_vit_feature:
            outs = [out + _resize_to(vit, out) for out, vit in zip(outs, vit_maps, strict=True)]
        return [
            norm(out)
            for norm, out in zip((self.norm1, self.norm2, self.norm3, self.norm4), outs, strict=True)
        ]


def _resize_to(vit_map: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, H', W') of ``target``, bilinear (``align_corners=False``); as is when equal."""
    size = tuple(target.shape[-2:])
    if tuple(vit_map.shape[-2:]) == size:
        return vit_map
    return F.interpolate(vit_map, size=size, mode="bilinear", align_corners=False)


def build_backbone(config: BackboneConfig) -> nn.Module:
    """:class:`TimmViTAdapter` for a timm trunk kind, :class:`models.backbone.ViTAdapter` for ``vit``/``beit``."""
    if config.trunk.kind in TIMM_TRUNK_KINDS:
        return TimmViTAdapter(config)
    return ViTAdapter(config)
