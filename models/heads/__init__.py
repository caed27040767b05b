"""Decode heads: UperNet (+ the FCN auxiliary head) and Mask2Former."""

from models.heads.fcn import FCNHead
from models.heads.mask2former import Mask2FormerCriterion, Mask2FormerHead, semantic_inference
from models.heads.upernet import UperNetHead

__all__ = ["FCNHead", "Mask2FormerCriterion", "Mask2FormerHead", "UperNetHead", "semantic_inference"]
