"""mmcv's ``ConvModule`` as the UperNet/FCN heads use it: conv (no bias) -> BatchNorm -> ReLU.

The submodule names ``conv``/``bn`` match the official checkpoints. mmcv initialises the conv with
Kaiming normal (fan_out, ReLU gain) and the norm with weight 1, bias 0.
"""

from __future__ import annotations

import torch
from torch import nn


class ConvModule(nn.Module):
    """Conv2d without bias, BatchNorm2d and ReLU.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: square kernel size; padding keeps the spatial size (``kernel_size // 2``).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU(inplace=True)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) -> (B, out_channels, H, W)."""
        return self.activate(self.bn(self.conv(x)))


class DecodeHeadBase(nn.Module):
    """The ``cls_seg`` step of mmseg's ``BaseDecodeHead``: Dropout2d then a 1x1 ``conv_seg``."""

    def _init_classifier(self, channels: int, num_classes: int, dropout_ratio: float) -> None:
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else nn.Identity()
        with torch.no_grad():
            nn.init.normal_(self.conv_seg.weight, mean=0.0, std=0.01)
            nn.init.zeros_(self.conv_seg.bias)

    def cls_seg(self, features: torch.Tensor) -> torch.Tensor:
        """(B, channels, h, w) -> (B, num_classes, h, w) logits."""
        return self.conv_seg(self.dropout(features))
