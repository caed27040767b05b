"""Backend dispatch of :func:`ms_deform_attn`.

A backend is a function with the reference signature plus an availability test for given
inputs. ``backend="auto"`` takes the first registered fast backend that is available for the
inputs and has passed its parity check, else the reference; an explicitly named backend that is
unknown or unavailable raises, nothing falls back silently. A backend is either verified when it
is registered, or carries a lazy ``self_check`` that ``auto`` runs (and the backend caches) the
first time it meets a device and dtype; a failed check is logged by the backend and ``auto``
keeps the reference there.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from cuda_ops.reference import ms_deform_attn_pytorch

log = logging.getLogger(__name__)

REFERENCE_BACKEND = "pytorch"
# forces the backend wherever a caller asks for "auto" (the model's config default): auto|pytorch|triton
BACKEND_ENV = "VITADAPTER_DEFORM_ATTN_BACKEND"
_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


class BackendFn(Protocol):
    def __call__(
        self,
        value: torch.Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
        sampling_locations: torch.Tensor,
        attention_weights: torch.Tensor,
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class Backend:
    """A registered implementation.

    Attributes:
        name: name given to ``ms_deform_attn(backend=...)``.
        fn: the implementation, with the reference signature.
        is_available: tells whether ``fn`` can run on the given value tensor (device, dtype,
            installed packages). Returns a reason string when it cannot, ``None`` when it can.
        verified: whether the backend passed its parity check against the reference; ``auto``
            only picks verified backends.
        self_check: for a backend that is not ``verified``: a lazy parity check against the
            reference for the device and dtype of the given value tensor, called by ``auto`` only
            on inputs the backend is available for. Returns whether ``auto`` may use the backend
            there; the backend caches the verdict and logs why a check failed.
    """

    name: str
    fn: BackendFn
    is_available: Callable[[torch.Tensor], str | None]
    verified: bool = False
    self_check: Callable[[torch.Tensor], bool] | None = None

    def usable_by_auto(self, value: torch.Tensor) -> bool:
        """Whether ``backend="auto"`` may run this backend on ``value``."""
        if self.name == REFERENCE_BACKEND or self.is_available(value) is not None:
            return False
        return self.verified or (self.self_check is not None and self.self_check(value))


_BACKENDS: dict[str, Backend] = {
    REFERENCE_BACKEND: Backend(
        name=REFERENCE_BACKEND, fn=ms_deform_attn_pytorch, is_available=lambda value: None, verified=True
    )
}


# calls per backend that actually ran in this process (what a run records)
_USAGE: dict[str, int] = {}


def backend_usage() -> dict[str, int]:
    """How many :func:`ms_deform_attn` calls each backend has run in this process so far."""
    return dict(_USAGE)


def usage_since(before: dict[str, int]) -> dict[str, int]:
    """The calls per backend since ``before`` (a :func:`backend_usage` snapshot), backends that ran only."""
    return {
        name: count - before.get(name, 0) for name, count in _USAGE.items() if count > before.get(name, 0)
    }


def requested_backend(backend: str = "auto") -> str:
    """``backend``, or for ``auto`` the one :data:`BACKEND_ENV` names when it is set.

    Raises:
        ValueError: the environment variable names no registered backend.
    """
    if backend != "auto":
        return backend
    forced = os.environ.get(BACKEND_ENV, "").strip().lower()
    if not forced or forced == "auto":
        return "auto"
    if forced not in _BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={forced!r} is not one of: auto, {', '.join(sorted(_BACKENDS))}")
    return forced


def register_backend(backend: Backend) -> None:
    """Register (or replace) a backend. The reference backend cannot be replaced."""
    if backend.name == REFERENCE_BACKEND:
        raise ValueError(f"the {REFERENCE_BACKEND!r} backend is the reference and cannot be replaced")
    _BACKENDS[backend.name] = backend


def available_backends(value: torch.Tensor | None = None) -> list[str]:
    """Names of the registered backends, restricted to those that can run on ``value`` if given."""
    if value is None:
        return list(_BACKENDS)
    return [name for name, b in _BACKENDS.items() if b.is_available(value) is None]


def _validate(
    value: torch.Tensor,
    spatial_shapes: Sequence[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> None:
    if isinstance(spatial_shapes, torch.Tensor):
        raise TypeError(
            "spatial_shapes must be a sequence of (H, W) Python ints, not a tensor "
            "(keeps the hot path free of device-to-host syncs); use spatial_shapes.tolist()"
        )
    if value.dim() != 4:
        raise ValueError(f"value must be (B, S, heads, channels), got shape {tuple(value.shape)}")
    if value.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"value dtype {value.dtype} is not one of {_SUPPORTED_DTYPES}")
    batch, length, heads, _ = value.shape
    total = sum(int(h) * int(w) for h, w in spatial_shapes)
    if total != length:
        raise ValueError(
            f"spatial_shapes {list(spatial_shapes)} cover {total} positions but value has {length} "
            "(for ViT-Adapter: input height and width must be multiples of 32)"
        )
    levels = len(spatial_shapes)
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            f"sampling_locations must be (B, Q, heads, levels, points, 2), got {tuple(sampling_locations.shape)}"
        )
    b, _, m, lv, _, _ = sampling_locations.shape
    if (b, m, lv) != (batch, heads, levels):
        raise ValueError(
            f"sampling_locations {tuple(sampling_locations.shape)} do not match value {tuple(value.shape)} "
            f"with {levels} levels"
        )
    if not sampling_locations.is_floating_point() or sampling_locations.dtype in (
        torch.bfloat16,
        torch.float16,
    ):
        raise ValueError(f"sampling_locations must be float32 or float64, got {sampling_locations.dtype}")
    if attention_weights.shape != sampling_locations.shape[:-1]:
        raise ValueError(
            f"attention_weights {tuple(attention_weights.shape)} must be {tuple(sampling_locations.shape[:-1])}"
        )


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: Sequence[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Multi-scale deformable attention.

    Args:
        value: (B, S, M, D) values, float32/float64/bfloat16/float16; ``S = sum(H_l * W_l)``.
        spatial_shapes: L pairs ``(H_l, W_l)`` of Python ints.
        sampling_locations: (B, Q, M, L, P, 2) normalised (x, y) locations, float32 or float64.
        attention_weights: (B, Q, M, L, P), normalised over L*P by the caller.
        backend: ``"auto"`` (the backend :data:`BACKEND_ENV` names when set; else the fastest
            verified backend available for these inputs, else the reference), ``"pytorch"`` (the
            reference), or the name of a registered backend (``"triton"``: CUDA tensors with triton
            installed). Each call counts towards :func:`backend_usage`.

    Returns:
        (B, Q, M * D) in the dtype of ``value``.

    Raises:
        ValueError: unknown backend or inconsistent shapes.
        RuntimeError: an explicitly requested backend cannot run on these inputs.
    """
    _validate(value, spatial_shapes, sampling_locations, attention_weights)
    shapes = [(int(h), int(w)) for h, w in spatial_shapes]
    chosen = _BACKENDS[resolve_backend(value, backend)]
    _USAGE[chosen.name] = _USAGE.get(chosen.name, 0) + 1
    return chosen.fn(value, shapes, sampling_locations, attention_weights)


def resolve_backend(value: torch.Tensor, backend: str = "auto") -> str:
    """The name of the backend ``ms_deform_attn(value, ..., backend=backend)`` runs.

    Raises:
        ValueError: unknown backend.
        RuntimeError: an explicitly requested backend cannot run on ``value``.
    """
    backend = requested_backend(backend)
    if backend == "auto":
        for candidate in _BACKENDS.values():
            if candidate.usable_by_auto(value):
                return candidate.name
        return REFERENCE_BACKEND
    chosen = _BACKENDS.get(backend)
    if chosen is None:
        raise ValueError(
            f"unknown ms_deform_attn backend {backend!r}; registered: {sorted(_BACKENDS)} or 'auto'"
        )
    reason = chosen.is_available(value)
    if reason is not None:
        raise RuntimeError(f"ms_deform_attn backend {backend!r} is unavailable for these inputs: {reason}")
    return chosen.name
