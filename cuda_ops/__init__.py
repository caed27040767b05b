"""Operators of ViT-Adapter: multi-scale deformable attention.

One public function, :func:`ms_deform_attn`, with a ``backend`` argument. The pure-PyTorch
reference backend is the ground truth; faster backends register themselves through
:func:`register_backend` and are chosen by ``backend="auto"`` only when available for the inputs
and verified against the reference.

The ``"triton"`` backend (:mod:`cuda_ops.triton_backend`) is registered here without importing
triton: importing :mod:`cuda_ops` works without triton installed, and triton is imported the first
time the backend is asked about a tensor it could run on. It runs CUDA tensors; CPU tensors only
through the Triton interpreter (``TRITON_INTERPRET=1`` set before triton is first imported: for
tests, slow), and ``auto`` never picks it there. ``auto`` picks it on CUDA only once its parity
self-check passed for that device and dtype (run lazily, once, at first use).

Which backend runs is chosen per call (``backend=``; the models take it from their config's
``deform_attn_backend``); ``auto`` defers to the environment variable ``VITADAPTER_DEFORM_ATTN_BACKEND``
when set. :func:`backend_usage` / :func:`usage_since` tell which backends actually ran, so every run can
record the kernel behind its numbers.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
from types import ModuleType

import torch

from cuda_ops.dispatch import (
    BACKEND_ENV,
    Backend,
    available_backends,
    backend_usage,
    ms_deform_attn,
    register_backend,
    requested_backend,
    resolve_backend,
    usage_since,
)
from cuda_ops.reference import core_dtype

__all__ = [
    "BACKEND_ENV",
    "TRITON_BACKEND",
    "available_backends",
    "backend_usage",
    "core_dtype",
    "ms_deform_attn",
    "register_backend",
    "requested_backend",
    "resolve_backend",
    "usage_since",
]

log = logging.getLogger(__name__)

TRITON_BACKEND = "triton"
_TRITON_MODULE = "cuda_ops.triton_backend"
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# devices on which backend="auto" may use the triton backend (the interpreter is for tests only)
_TRITON_AUTO_DEVICE_TYPES: tuple[str, ...] = ("cuda",)
_TRUTHY = ("1", "true", "on", "yes")  # what triton accepts for TRITON_INTERPRET


def _interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUTHY


def _triton_module() -> ModuleType:
    """The triton backend module, imported on first use."""
    return importlib.import_module(_TRITON_MODULE)


@functools.cache
def _triton_import_problem() -> str | None:
    """Why the triton backend module cannot be imported (None when it can); checked once."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'vitadapter[fast]')"
    try:
        _triton_module()
    except (ImportError, RuntimeError, OSError) as exc:
        problem = f"importing {_TRITON_MODULE} failed: {exc!r}"
        log.warning("ms_deform_attn backend %r is unavailable: %s", TRITON_BACKEND, problem)
        return problem
    return None


def _triton_unavailable(value: torch.Tensor) -> str | None:
    """Why the triton backend cannot run on ``value`` (None when it can)."""
    if value.dtype not in _TRITON_DTYPES:
        return f"it supports values of {_TRITON_DTYPES}, got {value.dtype}"
    if value.device.type == "cpu" and not _interpreter_requested():
        return (
            "CPU tensors run only through the Triton interpreter (set TRITON_INTERPRET=1 before triton "
            "is first imported; slow, meant for tests)"
        )
    if value.device.type not in ("cuda", "cpu"):
        return f"it runs CUDA tensors, got a {value.device.type} tensor"
    problem = _triton_import_problem()
    if problem is not None:
        return problem
    if value.device.type == "cpu" and not _triton_module().INTERPRETED:
        return f"{_TRITON_MODULE} was imported before TRITON_INTERPRET=1 was set, so its kernels compile for CUDA"
    return None


def _triton_fn(
    value: torch.Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    return _triton_module().ms_deform_attn_triton(
        value, spatial_shapes, sampling_locations, attention_weights
    )


def _triton_self_check(value: torch.Tensor) -> bool:
    """Whether ``auto`` may use the triton backend on ``value``'s device and dtype."""
    module = _triton_module()
    if value.device.type not in _TRITON_AUTO_DEVICE_TYPES or (
        value.device.type == "cuda" and module.INTERPRETED
    ):
        return False
    return module.passes_self_check(value.device, value.dtype)


register_backend(
    Backend(
        name=TRITON_BACKEND,
        fn=_triton_fn,
        is_available=_triton_unavailable,
        verified=False,
        self_check=_triton_self_check,
    )
)
