"""The ViT-Adapter modules: spatial prior module, deformable attention, injector/extractor interactions."""

from models.adapter.deform_inputs import DeformInputs, deform_inputs
from models.adapter.interaction import ConvFFN, Extractor, Injector, InteractionBlock
from models.adapter.ms_deform_attn import MSDeformAttn
from models.adapter.spm import SpatialPriorModule, SpatialPriors

__all__ = [
    "ConvFFN",
    "DeformInputs",
    "Extractor",
    "Injector",
    "InteractionBlock",
    "MSDeformAttn",
    "SpatialPriorModule",
    "SpatialPriors",
    "deform_inputs",
]
