"""Transformer trunks of ViT-Adapter: the plain ViT (DeiT / AugReg) and BEiT (BEiT / BEiTv2) blocks."""

from models.trunks.beit import make_beit_block
from models.trunks.vit import ViTBlock, resize_pos_embed

__all__ = ["ViTBlock", "make_beit_block", "resize_pos_embed"]
