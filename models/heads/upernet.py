"""UperNet decode head with mmsegmentation 0.x ``UPerHead`` semantics (docs/reference.md §P4).

Pyramid pooling on the coarsest input (adaptive average pools of ``pool_scales``, 1x1 ConvModule,
bilinear back to the input size, concatenated with the input, 3x3 ``bottleneck``), 1x1 lateral
convs on the other inputs, top-down addition of bilinearly upsampled coarser laterals, 3x3
``fpn_convs``, every level upsampled to the finest and concatenated, 3x3 ``fpn_bottleneck``,
Dropout2d and the 1x1 classifier. ``align_corners=False`` everywhere. Output at the finest input
resolution (1/4 of the image).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.config import UperNetConfig
from models.heads.conv_module import ConvModule, DecodeHeadBase


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class UperNetHead(DecodeHeadBase):
    """UPerHead over the four backbone outputs.

    Args:
        in_channels: channels of each input level, finest first.
        num_classes: classifier outputs.
        config: head width, pooling scales, dropout.
    """

    def __init__(self, *, in_channels: Sequence[int], num_classes: int, config: UperNetConfig) -> None:
        super().__init__()
        channels = config.channels
        self.in_channels = tuple(in_channels)
        self._init_classifier(channels, num_classes, config.dropout_ratio)
        self.psp_modules = nn.ModuleList(
            [
                nn.Sequential(nn.AdaptiveAvgPool2d(scale), ConvModule(self.in_channels[-1], channels, 1))
                for scale in config.pool_scales
            ]
        )
        self.bottleneck = ConvModule(self.in_channels[-1] + len(config.pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList([ConvModule(c, channels, 1) for c in self.in_channels[:-1]])
        self.fpn_convs = nn.ModuleList([ConvModule(channels, channels, 3) for _ in self.in_channels[:-1]])
        self.fpn_bottleneck = ConvModule(len(self.in_channels) * channels, channels, 3)

    def _pyramid_pooling(self, x: torch.Tensor) -> torch.Tensor:
        pooled = [x] + [_resize(module(x), x.shape[2:]) for module in self.psp_modules]
        return self.bottleneck(torch.cat(pooled, dim=1))

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Four (B, C_i, H_i, W_i) maps, finest first -> (B, num_classes, H_0, W_0) logits."""
        laterals = [conv(inputs[i]) for i, conv in enumerate(self.lateral_convs)]
        laterals.append(self._pyramid_pooling(inputs[-1]))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(laterals[i]) for i, conv in enumerate(self.fpn_convs)]
        outs.append(laterals[-1])
        outs = [outs[0]] + [_resize(o, outs[0].shape[2:]) for o in outs[1:]]
        return self.cls_seg(self.fpn_bottleneck(torch.cat(outs, dim=1)))
