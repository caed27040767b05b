"""Mask2Former head (pixel decoder, masked-attention decoder, criterion, semantic inference),
following ViT-Adapter's ``mmseg_custom`` Mask2Former (docs/reference.md §P4, docs/reference.md §R2.4-R2.5)."""

from models.heads.mask2former.criterion import Mask2FormerCriterion, semantic_targets
from models.heads.mask2former.head import Mask2FormerHead
from models.heads.mask2former.inference import semantic_inference
from models.heads.mask2former.matcher import HungarianMatcher
from models.heads.mask2former.pixel_decoder import MSDeformAttnPixelDecoder
from models.heads.mask2former.positional_encoding import sine_positional_encoding
from models.heads.mask2former.transformer_decoder import MaskedAttentionDecoder

__all__ = [
    "HungarianMatcher",
    "MSDeformAttnPixelDecoder",
    "Mask2FormerCriterion",
    "Mask2FormerHead",
    "MaskedAttentionDecoder",
    "semantic_inference",
    "semantic_targets",
    "sine_positional_encoding",
]
