"""FCN auxiliary head with mmsegmentation 0.x ``FCNHead`` semantics (docs/reference.md §P4).

``num_convs`` ConvModules (3x3) on backbone output ``in_index`` (stride 16), no input concat,
Dropout2d and the 1x1 classifier. Used for the auxiliary loss only, not at test time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from models.config import FCNConfig
from models.heads.conv_module import ConvModule, DecodeHeadBase


class FCNHead(DecodeHeadBase):
    """FCNHead on one backbone level.

    Args:
        in_channels: channels of the selected input level.
        num_classes: classifier outputs.
        config: width, number of convs, kernel size, input index, dropout.
    """

    def __init__(self, *, in_channels: int, num_classes: int, config: FCNConfig) -> None:
        super().__init__()
        if config.concat_input:
            raise ValueError("FCNHead with concat_input=True is not used by any reference config")
        self.in_index = config.in_index
        self._init_classifier(config.channels, num_classes, config.dropout_ratio)
        widths = [in_channels] + [config.channels] * config.num_convs
        self.convs = nn.Sequential(
            *[ConvModule(widths[i], widths[i + 1], config.kernel_size) for i in range(config.num_convs)]
        )

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Backbone maps -> (B, num_classes, H, W) logits at the resolution of ``inputs[in_index]``."""
        return self.cls_seg(self.convs(inputs[self.in_index]))
