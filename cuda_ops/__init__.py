"""Operators of ViT-Adapter: multi-scale deformable attention.

One public function, :func:`ms_deform_attn`, with a ``backend`` argument. The pure-PyTorch
reference backend is the ground truth; faster backends register themselves through
:func:`register_backend` and are chosen by ``backend="auto"`` only when available for the inputs.
"""

from cuda_ops.dispatch import available_backends, ms_deform_attn, register_backend

__all__ = ["available_backends", "ms_deform_attn", "register_backend"]
