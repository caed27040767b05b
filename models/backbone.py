"""ViT-Adapter backbone: a ViT or BEiT trunk with the adapter around it (Chen et al., "Vision
Transformer Adapter for Dense Predictions", ICLR 2023).

Follows the reference ``ViTAdapter`` / ``BEiTAdapter`` forward (docs/reference.md §P1-P3):
spatial priors (+ ``level_embed`` on the 1/8, 1/16, 1/32 tokens), patch tokens (+ the resized
``pos_embed`` for ViT; the cls token kept aside for BEiT), four interactions, then the adapter
tokens are split back into maps, ``c1 = up(c2) + spm.c1``, each interaction's ViT output is
bilinearly resized x4/x2/x1/x0.5 and added, and every map gets its own BatchNorm.

Parameter names equal the official checkpoints' (``docs/reference.md`` §G2), so an
official ``state_dict`` loads as is. One class serves both trunks; where they differ (cls token,
position embedding, block type) is spelled out below.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models._timm import PatchEmbed, trunc_normal_
from models.adapter import InteractionBlock, MSDeformAttn, SpatialPriorModule, deform_inputs
from models.config import BackboneConfig
from models.trunks import ViTBlock, make_beit_block, resize_pos_embed

# the input must be divisible by the coarsest adapter stride (SPM convs vs deform_inputs, ConvFFN split)
SIZE_DIVISOR = 32
OUTPUT_STRIDES = (4, 8, 16, 32)
POS_EMBED_STD = 0.02


def build_interactions(config: BackboneConfig) -> nn.ModuleList:
    """The adapter's interaction blocks (injector + extractor per group of trunk blocks), whatever the trunk."""
    trunk, adapter = config.trunk, config.adapter
    last = len(adapter.interaction_indexes) - 1
    return nn.ModuleList(
        [
            InteractionBlock(
                dim=trunk.embed_dim,
                num_heads=adapter.deform_num_heads,
                n_points=adapter.n_points,
                deform_ratio=adapter.deform_ratio,
                cffn_ratio=adapter.cffn_ratio,
                drop_path=trunk.drop_path_rate,
                init_values=adapter.injector_init_values,
                extra_extractor=adapter.use_extra_extractor and i == last,
                with_cffn=adapter.with_cffn,
                with_cp=config.with_cp,
            )
            for i in range(len(adapter.interaction_indexes))
        ]
    )


@torch.no_grad()
def reference_init(modules: list[nn.Module], *, skip: nn.Module | None = None) -> None:
    """The reference's initialisation rule over ``modules`` (docs/reference.md §P3, "Init"), in its order.

    Linear trunc_normal(0.02) / bias 0; LayerNorm and BatchNorm 1/0; Conv and ConvTranspose (except
    ``skip``) normal(0, sqrt(2/fan_out)) / bias 0; then every MSDeformAttn re-initialised by its own rule.
    """
    for module in modules:
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm | nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d | nn.ConvTranspose2d) and module is not skip:
            fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
            nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    for module in modules:
        if isinstance(module, MSDeformAttn):
            module.reset_parameters()


class ViTAdapter(nn.Module):
    """ViT-Adapter backbone returning four maps at strides 4, 8, 16, 32.

    Args:
        config: trunk, adapter and checkpointing settings.

    Attributes:
        out_channels: channels of each output (= trunk width).
        out_strides: (4, 8, 16, 32).
    """

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        trunk, adapter = config.trunk, config.adapter
        dim = trunk.embed_dim
        self.config = config
        self.is_beit = trunk.kind == "beit"
        self.patch_size = trunk.patch_size
        self.pretrain_grid = trunk.img_size // trunk.patch_size
        self.out_channels = dim
        self.out_strides = OUTPUT_STRIDES
        self.interaction_indexes = adapter.interaction_indexes
        self.with_cp = config.with_cp

        if self.is_beit:
            # BEiT: cls token kept (through the blocks, not through the adapter); no absolute pos-emb
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
            self.pos_embed = None
        else:
            # ViT: no cls token; the learned pos_embed keeps its cls slot (1 + G*G positions)
            self.cls_token = None
            self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.pretrain_grid**2, dim))
        self.level_embed = nn.Parameter(torch.zeros(3, dim))
        self.patch_embed = PatchEmbed(
            img_size=None, patch_size=trunk.patch_size, in_chans=3, embed_dim=dim, flatten=False
        )
        drop_rates = torch.linspace(0, trunk.drop_path_rate, trunk.depth, device="cpu").tolist()
        if self.is_beit:
            window = (self.pretrain_grid, self.pretrain_grid)
            blocks = [
                make_beit_block(
                    dim=dim,
                    num_heads=trunk.num_heads,
                    mlp_ratio=trunk.mlp_ratio,
                    drop_path=rate,
                    layer_scale_init=trunk.layer_scale_init,
                    window=window,
                )
                for rate in drop_rates
            ]
        else:
            blocks = [
                ViTBlock(
                    dim=dim,
                    num_heads=trunk.num_heads,
                    mlp_ratio=trunk.mlp_ratio,
                    qkv_bias=trunk.qkv_bias,
                    drop_path=rate,
                    layer_scale_init=trunk.layer_scale_init,
                )
                for rate in drop_rates
            ]
        self.blocks = nn.ModuleList(blocks)
        self.spm = SpatialPriorModule(inplanes=adapter.conv_inplane, embed_dim=dim)
        self.interactions = build_interactions(config)
        self.add_vit_feature = adapter.add_vit_feature
        self.up = nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2)
        self.norm1 = nn.BatchNorm2d(dim)
        self.norm2 = nn.BatchNorm2d(dim)
        self.norm3 = nn.BatchNorm2d(dim)
        self.norm4 = nn.BatchNorm2d(dim)
        if self.level_embed.device.type != "meta":  # shapes only (parameter counting): nothing to initialise
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The reference initialisation (used when training without a checkpoint for a part).

        Trunk: Linear trunc_normal(0.02), LayerNorm 1/0, ``cls_token``/``pos_embed`` trunc_normal(0.02),
        layer scales at their init values. Adapter (docs/reference.md §P3, "Init"): Linear
        trunc_normal(0.02) / bias 0; norms 1/0; Conv and ConvTranspose normal(0, sqrt(2/fan_out));
        every MSDeformAttn re-initialised by its own rule; ``level_embed`` normal(0, 1).
        """
        reference_init(list(self.modules()), skip=self.patch_embed.proj)
        for block in self.blocks:
            if self.is_beit:
                block.reset_parameters()  # layer scale
                block.attn.reset_parameters()  # q/v bias, relative position table and index
            else:
                block.gamma1.fill_(self.config.trunk.layer_scale_init)
                block.gamma2.fill_(self.config.trunk.layer_scale_init)
        if self.cls_token is not None:
            trunc_normal_(self.cls_token, std=POS_EMBED_STD)
        if self.pos_embed is not None:
            trunc_normal_(self.pos_embed, std=POS_EMBED_STD)
        nn.init.normal_(self.level_embed)

    def check_input_size(self, height: int, width: int) -> None:
        """Raise ValueError if (height, width) cannot go through this backbone."""
        if height % SIZE_DIVISOR or width % SIZE_DIVISOR:
            raise ValueError(
                f"input size {height}x{width} is not a multiple of {SIZE_DIVISOR} in height and width "
                "(ViT-Adapter needs it; the test pipeline's ResizeToMultiple(32) guarantees it)"
            )
        if self.is_beit:
            size = self.pretrain_grid * self.patch_size
            if (height, width) != (size, size):
                raise ValueError(
                    f"input size {height}x{width} does not match the BEiT trunk's img_size {size}x{size}: "
                    "its relative position bias is built for exactly that size (use slide inference)"
                )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) image -> four (B, C, H/s, W/s) maps for s = 4, 8, 16, 32."""
        height, width = x.shape[-2:]
        self.check_input_size(height, width)
        injector_inputs, extractor_inputs = deform_inputs(height, width, x.device)

        priors = self.spm(x)
        c2 = priors.c2 + self.level_embed[0]
        c3 = priors.c3 + self.level_embed[1]
        c4 = priors.c4 + self.level_embed[2]
        c = torch.cat([c2, c3, c4], dim=1)  # (B, S, C) with S = HW/64 + HW/256 + HW/1024

        tokens = self.patch_embed(x)  # (B, C, h, w), h = H/16
        batch, dim, grid_h, grid_w = tokens.shape
        tokens = tokens.flatten(2).transpose(1, 2)  # (B, h*w, C)
        cls = None
        if self.is_beit:
            cls = self.cls_token.expand(batch, -1, -1)
        else:
            tokens = tokens + resize_pos_embed(self.pos_embed, self.pretrain_grid, grid_h, grid_w)

        vit_maps = []
        for interaction, (first, last) in zip(self.interactions, self.interaction_indexes, strict=True):
            tokens, c, cls = interaction(
                tokens,
                c,
                cls,
                self.blocks[first : last + 1],
                injector_inputs,
                extractor_inputs,
                grid_h,
                grid_w,
            )
            # (B, h*w, C) -> (B, C, h*w) -> (B, C, h, w)
            vit_maps.append(tokens.transpose(1, 2).reshape(batch, dim, grid_h, grid_w))

        # split the adapter tokens back into the 1/8, 1/16, 1/32 maps
        n2, n3 = c2.shape[1], c3.shape[1]
        # (B, n, C) -> (B, C, n) -> (B, C, h', w')
        f2 = c[:, :n2].transpose(1, 2).reshape(batch, dim, 2 * grid_h, 2 * grid_w)
        f3 = c[:, n2 : n2 + n3].transpose(1, 2).reshape(batch, dim, grid_h, grid_w)
        f4 = c[:, n2 + n3 :].transpose(1, 2).reshape(batch, dim, grid_h // 2, grid_w // 2)
        f1 = self.up(f2) + priors.c1
        if self.add_vit_feature:
            x1, x2, x3, x4 = vit_maps
            # scale_factor (not size) as the reference: they differ for odd sizes
            f1 = f1 + F.interpolate(x1, scale_factor=4, mode="bilinear", align_corners=False)
            f2 = f2 + F.interpolate(x2, scale_factor=2, mode="bilinear", align_corners=False)
            f3 = f3 + x3
            f4 = f4 + F.interpolate(x4, scale_factor=0.5, mode="bilinear", align_corners=False)
        return [self.norm1(f1), self.norm2(f2), self.norm3(f3), self.norm4(f4)]
