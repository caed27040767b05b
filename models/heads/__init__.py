"""Decode heads: UperNet (+ the FCN auxiliary head). Mask2Former arrives with its own issue."""

from models.heads.fcn import FCNHead
from models.heads.upernet import UperNetHead

__all__ = ["FCNHead", "UperNetHead"]
