"""Spatial Prior Module (docs/reference.md §P3, "Spatial Prior Module").

A convolutional stem (three 3x3 convs, the first with stride 2, then a stride-2 max pool: 1/4)
followed by three stride-2 3x3 convs (1/8, 1/16, 1/32) of 2x, 4x and 4x ``inplanes`` channels (the
last keeps 256, not 512), all without conv bias and each with BatchNorm (SyncBatchNorm in
multi-GPU training, converted by the trainer) and ReLU; 1x1 convolutions with bias (``fc1..fc4``)
project every level to the trunk width. The 1/8..1/32 maps are returned as tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class SpatialPriors(NamedTuple):
    """Outputs of the SpatialPriorModule.

    Attributes:
        c1: (B, C, H/4, W/4) map.
        c2, c3, c4: (B, HW/64, C), (B, HW/256, C), (B, HW/1024, C) tokens.
    """

    c1: torch.Tensor
    c2: torch.Tensor
    c3: torch.Tensor
    c4: torch.Tensor


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class SpatialPriorModule(nn.Module):
    """Convolutional spatial priors at strides 4, 8, 16 and 32.

    Args:
        inplanes: stem width (64 in every config).
        embed_dim: trunk width C that every level is projected to.
    """

    def __init__(self, *, inplanes: int, embed_dim: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            *_conv_bn_relu(3, inplanes, stride=2),
            *_conv_bn_relu(inplanes, inplanes, stride=1),
            *_conv_bn_relu(inplanes, inplanes, stride=1),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        self.conv2 = nn.Sequential(*_conv_bn_relu(inplanes, 2 * inplanes, stride=2))
        self.conv3 = nn.Sequential(*_conv_bn_relu(2 * inplanes, 4 * inplanes, stride=2))
        self.conv4 = nn.Sequential(*_conv_bn_relu(4 * inplanes, 4 * inplanes, stride=2))
        self.fc1 = nn.Conv2d(inplanes, embed_dim, kernel_size=1, bias=True)
        self.fc2 = nn.Conv2d(2 * inplanes, embed_dim, kernel_size=1, bias=True)
        self.fc3 = nn.Conv2d(4 * inplanes, embed_dim, kernel_size=1, bias=True)
        self.fc4 = nn.Conv2d(4 * inplanes, embed_dim, kernel_size=1, bias=True)

    def forward(self, x: torch.Tensor) -> SpatialPriors:
        """(B, 3, H, W) image -> :class:`SpatialPriors`."""
        c1 = self.stem(x)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        # (B, C, h, w) -> (B, C, h*w) -> (B, h*w, C)
        return SpatialPriors(
            c1=self.fc1(c1),
            c2=self.fc2(c2).flatten(2).transpose(1, 2),
            c3=self.fc3(c3).flatten(2).transpose(1, 2),
            c4=self.fc4(c4).flatten(2).transpose(1, 2),
        )
