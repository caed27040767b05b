# ruff: noqa: N803 (upper-case names mark Triton compile-time constants, as in Triton's own code)
"""Triton multi-scale deformable attention, forward and backward (the ``"triton"`` backend).

Computes exactly the function of :func:`cuda_ops.reference.ms_deform_attn_pytorch` (reference
ViT-Adapter / Deformable-DETR sampling, docs/reference.md §P3, §P5):
bilinear sampling with zero padding at pixel coordinate ``loc * size - 0.5``
(``align_corners=False``), weighted by the attention weights (softmax-normalised by the caller)
and summed per head. Values may be float32, bfloat16 or float16; sampling locations are float32;
all arithmetic is float32 and the output has the value dtype. Gradients are those of the reference
compiled op: value, sampling locations and attention weights. Where the reference CUDA kernel
differs from ``grid_sample`` (a sample whose pixel coordinate is exactly -1: the kernel drops it,
so its location gradient is 0; ``grid_sample`` gives the one-sided derivative), this backend
follows ``grid_sample``, the ground truth here. The attention weights arrive normalised (the
reference signature), so the softmax is not fused here.

Block layout (both kernels): one program per (block of ``BLOCK_Q`` consecutive queries, head,
batch element) holds a ``(BLOCK_Q, D)`` float32 tile, all ``D`` channels of one head. The value
tensor is ``(B, S, M, D)``, so a bilinear corner of a head is ``D`` contiguous elements: one
64-byte row in bfloat16 at ``D = 32``, loaded as 16-byte vectors. Location arithmetic (pixel
coordinate, corner indices, bilinear weights, border masks) is fused into the kernel; nothing is
precomputed on the host except the per-level ``(H, W)`` and start offsets (cached per device).
Consecutive queries of ViT-Adapter and the pixel decoder are neighbouring grid cells, so one
program samples nearby value rows, which stay in L1/L2.

Backward: the location and weight gradients come from four per-corner channel reductions
``sum_d grad_out * value_corner``, stored directly (each belongs to one program). The value
gradient is a scatter: for large levels each program adds its weighted ``grad_out`` rows to the
four corners with float32 ``atomic_add`` (relaxed ordering); for levels of at most
``dense_max_positions`` positions, where many queries hit the same positions and atomics contend,
the program builds the ``(positions, BLOCK_Q)`` matrix of its bilinear weights one chunk of
positions at a time, only over the span of positions its queries touch, multiplies it with its
``grad_out`` tile (``tl.dot``) on chip and adds each chunk once, coalesced. Low-precision value
gradients are accumulated in a float32 buffer and rounded once at the end.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from cuda_ops.reference import ms_deform_attn_pytorch

log = logging.getLogger(__name__)

# Kernels created while TRITON_INTERPRET=1 was set run on CPU tensors through the interpreter
# (slow; for tests), otherwise they compile for CUDA. Triton decides this when a kernel is defined.
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MIN_DOT_SIZE = 16  # tl.dot needs every block dimension >= 16


# Defaults chosen from the sm_90 compile report (benchmarks/ms_deform_attn/compile_report.py: no
# spills, about 100-130 registers a thread), not from timings: no GPU was lent when they were set.
# One (BLOCK_Q, BLOCK_D) tile holds 8 elements a thread: one 16-byte vector of bfloat16.
TILE_ELEMENTS_PER_THREAD = 8
THREADS_PER_WARP = 32
FORWARD_WARPS = 4
BACKWARD_BLOCK_Q = 32
MAX_WARPS = 8
# levels of at most this many positions take the on-chip value-gradient path: the injector's
# 16x16 and 32x32 levels, the extractor's 32x32 level, the pixel decoder's coarsest level
DENSE_MAX_POSITIONS = 1024
DENSE_CHUNK = 32
LEVEL_TABLE_CACHE_SIZE = 64  # distinct (spatial shapes, device) pairs kept on the device


@dataclass(frozen=True)
class TritonConfig:
    """Launch parameters of one kernel.

    Attributes:
        block_q: queries per program (power of two, >= 16).
        num_warps: warps per program.
        dense_max_positions: (backward) levels with at most this many positions accumulate their
            value gradient on chip (one-hot ``tl.dot``) instead of per-sample atomics; 0 disables it.
        dense_chunk: (backward) positions per on-chip chunk (power of two, >= 16).
    """

    block_q: int
    num_warps: int
    dense_max_positions: int = DENSE_MAX_POSITIONS
    dense_chunk: int = DENSE_CHUNK

    def __post_init__(self) -> None:
        for name in ("block_q", "dense_chunk"):
            size = getattr(self, name)
            if size < MIN_DOT_SIZE or size & (size - 1):
                raise ValueError(f"{name} must be a power of two >= {MIN_DOT_SIZE}, got {size}")
        if self.num_warps < 1 or self.num_warps & (self.num_warps - 1):
            raise ValueError(f"num_warps must be a power of two, got {self.num_warps}")


def _block_d(channels: int) -> int:
    return max(MIN_DOT_SIZE, triton.next_power_of_2(channels))


def forward_config_default(channels: int) -> TritonConfig:
    """Default forward launch parameters for ``channels`` per head (32 queries at 32 channels)."""
    tile = TILE_ELEMENTS_PER_THREAD * THREADS_PER_WARP * FORWARD_WARPS
    return TritonConfig(block_q=max(MIN_DOT_SIZE, tile // _block_d(channels)), num_warps=FORWARD_WARPS)


def backward_config_default(channels: int) -> TritonConfig:
    """Default backward launch parameters for ``channels`` per head (4 warps at 32 channels)."""
    warps = BACKWARD_BLOCK_Q * _block_d(channels) // (TILE_ELEMENTS_PER_THREAD * THREADS_PER_WARP)
    return TritonConfig(block_q=BACKWARD_BLOCK_Q, num_warps=min(MAX_WARPS, max(FORWARD_WARPS, warps)))


@triton.jit
def _sample_setup(loc_ptrs, attn_ptrs, q_mask, height, width):
    """Pixel coordinates, corner index and border masks of one point for a block of queries.

    Returns ``r00`` (level-local index of the top-left corner, (BLOCK_Q,) int32), the fractional
    offsets ``fx``, ``fy``, the attention weight, and the validity of the low/high column and row.
    Validity is decided on floats so that huge or NaN locations never form an index.
    """
    loc_x = tl.load(loc_ptrs, mask=q_mask, other=0.0)
    loc_y = tl.load(loc_ptrs + 1, mask=q_mask, other=0.0)
    attn = tl.load(attn_ptrs, mask=q_mask, other=0.0).to(tl.float32)
    x = loc_x * width - 0.5
    y = loc_y * height - 0.5
    x0f = tl.floor(x)
    y0f = tl.floor(y)
    fx = x - x0f
    fy = y - y0f
    x_lo = q_mask & (x0f >= 0) & (x0f < width)
    x_hi = q_mask & (x0f >= -1) & (x0f < width - 1)
    y_lo = (y0f >= 0) & (y0f < height)
    y_hi = (y0f >= -1) & (y0f < height - 1)
    in_range = q_mask & (x0f >= -1) & (x0f < width) & (y0f >= -1) & (y0f < height)
    x0 = tl.where(in_range, x0f, 0.0).to(tl.int32)
    y0 = tl.where(in_range, y0f, 0.0).to(tl.int32)
    return y0 * width + x0, fx, fy, attn, x_lo, x_hi, y_lo, y_hi


@triton.jit
def _gather(base, rows, row_stride, d, mask, EVEN_D: tl.constexpr, CHANNELS: tl.constexpr):
    """(BLOCK_Q, BLOCK_D) float32 tile of value rows ``rows`` (zero where ``mask`` is false)."""
    ptrs = base + rows[:, None] * row_stride + d[None, :]
    if EVEN_D:
        tile = tl.load(ptrs, mask=mask[:, None], other=0.0)
    else:
        tile = tl.load(ptrs, mask=mask[:, None] & (d[None, :] < CHANNELS), other=0.0)
    return tile.to(tl.float32)


@triton.jit
def _scatter_add(base, rows, row_stride, d, weight, g, mask, EVEN_D: tl.constexpr, CHANNELS: tl.constexpr):
    """Atomically add ``weight[:, None] * g`` to the value rows ``rows`` where ``mask`` is true."""
    ptrs = base + rows[:, None] * row_stride + d[None, :]
    update = weight[:, None] * g
    if EVEN_D:
        tl.atomic_add(ptrs, update, mask=mask[:, None], sem="relaxed")
    else:
        tl.atomic_add(ptrs, update, mask=mask[:, None] & (d[None, :] < CHANNELS), sem="relaxed")


@triton.jit
def _round_to(x, dtype: tl.constexpr, interpreter: tl.constexpr):
    """``x`` (float32) rounded to nearest-even in ``dtype``.

    The Triton interpreter converts float32 to bfloat16 by truncation (and its round-to-nearest
    mode loses the carry into the exponent), so under it the rounding is done on the bits.
    """
    if dtype == tl.float32:
        return x
    elif interpreter and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)  # keep NaN a NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def _forward_kernel(
    value_ptr,  # (B, S, M, D)
    shapes_ptr,  # (L, 2) int32 (H, W)
    starts_ptr,  # (L,) int32
    loc_ptr,  # (B, Q, M, L, P, 2) float32
    attn_ptr,  # (B, Q, M, L, P)
    out_ptr,  # (B, Q, M * D)
    num_queries,
    num_keys,
    num_heads,
    CHANNELS: tl.constexpr,
    LEVELS: tl.constexpr,
    POINTS: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INTERPRETER: tl.constexpr,
):
    q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    head = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    q_mask = q < num_queries
    d = tl.arange(0, BLOCK_D)
    EVEN_D: tl.constexpr = BLOCK_D == CHANNELS
    row_stride = num_heads * CHANNELS
    value_base = value_ptr + batch * num_keys * row_stride + head * CHANNELS
    # flat (batch, query, head) index of each query row of loc / attn / out
    qh = (batch * num_queries + q) * num_heads + head
    loc_row = loc_ptr + qh * (LEVELS * POINTS * 2)
    attn_row = attn_ptr + qh * (LEVELS * POINTS)
    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
    # levels in a loop, points unrolled: 4 * POINTS corner loads in flight per iteration
    for level in range(LEVELS):
        height = tl.load(shapes_ptr + 2 * level)
        width = tl.load(shapes_ptr + 2 * level + 1)
        start = tl.load(starts_ptr + level)
        for point in tl.static_range(POINTS):
            col = level * POINTS + point
            r00, fx, fy, attn, x_lo, x_hi, y_lo, y_hi = _sample_setup(
                loc_row + 2 * col, attn_row + col, q_mask, height, width
            )
            rows = start + r00
            hx = 1.0 - fx
            hy = 1.0 - fy
            v00 = _gather(value_base, rows, row_stride, d, y_lo & x_lo, EVEN_D, CHANNELS)
            v01 = _gather(value_base, rows + 1, row_stride, d, y_lo & x_hi, EVEN_D, CHANNELS)
            v10 = _gather(value_base, rows + width, row_stride, d, y_hi & x_lo, EVEN_D, CHANNELS)
            v11 = _gather(value_base, rows + width + 1, row_stride, d, y_hi & x_hi, EVEN_D, CHANNELS)
            acc += (attn * hy * hx)[:, None] * v00 + (attn * hy * fx)[:, None] * v01
            acc += (attn * fy * hx)[:, None] * v10 + (attn * fy * fx)[:, None] * v11
    out_ptrs = out_ptr + qh[:, None] * CHANNELS + d[None, :]
    out = _round_to(acc, out_ptr.dtype.element_ty, INTERPRETER)
    tl.store(out_ptrs, out, mask=q_mask[:, None] & (d[None, :] < CHANNELS))


@triton.jit
def _dense_value_grad(
    grad_value_base,
    loc_row,
    attn_row,
    q_mask,
    g,
    d,
    lo,
    hi,
    level,
    height,
    width,
    start,
    row_stride,
    CHANNELS: tl.constexpr,
    POINTS: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    EVEN_D: tl.constexpr,
    DENSE_CHUNK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """On-chip value gradient of one level for one block of queries.

    For each chunk of ``DENSE_CHUNK`` level positions within the span ``[lo, hi]`` that the block
    touches, builds the (DENSE_CHUNK, BLOCK_Q) matrix of attention times bilinear weights (summed
    over points and corners), multiplies it with the (BLOCK_Q, BLOCK_D) ``grad_out`` tile and adds
    the (DENSE_CHUNK, BLOCK_D) result once: one coalesced atomic row per position instead of one per
    sample and corner.
    """
    positions = height * width
    first = lo // DENSE_CHUNK
    stop = (hi + DENSE_CHUNK) // DENSE_CHUNK  # 0 when nothing was touched (hi == -1)
    ones = tl.full((DENSE_CHUNK,), 1.0, tl.float32)
    for chunk in range(first, stop):
        pos = chunk * DENSE_CHUNK + tl.arange(0, DENSE_CHUNK)
        weights = tl.zeros((DENSE_CHUNK, BLOCK_Q), dtype=tl.float32)
        for point in range(POINTS):
            col = level * POINTS + point
            r00, fx, fy, attn, x_lo, x_hi, y_lo, y_hi = _sample_setup(
                loc_row + 2 * col, attn_row + col, q_mask, height, width
            )
            # invalid corners get weight 0, so an index that aliases another pixel adds 0
            w00 = tl.where(y_lo & x_lo, attn * (1.0 - fy) * (1.0 - fx), 0.0)
            w01 = tl.where(y_lo & x_hi, attn * (1.0 - fy) * fx, 0.0)
            w10 = tl.where(y_hi & x_lo, attn * fy * (1.0 - fx), 0.0)
            w11 = tl.where(y_hi & x_hi, attn * fy * fx, 0.0)
            offset = pos[:, None] - r00[None, :]  # (DENSE_CHUNK, BLOCK_Q)
            weights += tl.where(offset == 0, w00[None, :], 0.0)
            weights += tl.where(offset == 1, w01[None, :], 0.0)
            weights += tl.where(offset == width, w10[None, :], 0.0)
            weights += tl.where(offset == width + 1, w11[None, :], 0.0)
        update = tl.dot(weights, g, input_precision=DOT_PRECISION)  # (DENSE_CHUNK, BLOCK_D)
        _scatter_add(
            grad_value_base, start + pos, row_stride, d, ones, update, pos < positions, EVEN_D, CHANNELS
        )


@triton.jit
def _backward_kernel(
    value_ptr,  # (B, S, M, D)
    shapes_ptr,  # (L, 2) int32 (H, W)
    starts_ptr,  # (L,) int32
    loc_ptr,  # (B, Q, M, L, P, 2) float32
    attn_ptr,  # (B, Q, M, L, P)
    grad_out_ptr,  # (B, Q, M * D)
    grad_value_ptr,  # (B, S, M, D) float32, zero-initialised
    grad_loc_ptr,  # (B, Q, M, L, P, 2) float32
    grad_attn_ptr,  # (B, Q, M, L, P)
    num_queries,
    num_keys,
    num_heads,
    dense_levels,  # bit l set: level l accumulates its value gradient on chip
    CHANNELS: tl.constexpr,
    LEVELS: tl.constexpr,
    POINTS: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_ATOMIC: tl.constexpr,  # some level scatters its value gradient with per-sample atomics
    HAS_DENSE: tl.constexpr,  # some level accumulates its value gradient on chip
    DENSE_CHUNK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRETER: tl.constexpr,
):
    q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    head = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    q_mask = q < num_queries
    d = tl.arange(0, BLOCK_D)
    EVEN_D: tl.constexpr = BLOCK_D == CHANNELS
    row_stride = num_heads * CHANNELS
    batch_offset = batch * num_keys * row_stride + head * CHANNELS
    value_base = value_ptr + batch_offset
    grad_value_base = grad_value_ptr + batch_offset
    qh = (batch * num_queries + q) * num_heads + head
    loc_row = loc_ptr + qh * (LEVELS * POINTS * 2)
    attn_row = attn_ptr + qh * (LEVELS * POINTS)
    g_mask = q_mask[:, None] & (d[None, :] < CHANNELS)
    g = tl.load(grad_out_ptr + qh[:, None] * CHANNELS + d[None, :], mask=g_mask, other=0.0).to(tl.float32)
    for level in range(LEVELS):
        height = tl.load(shapes_ptr + 2 * level)
        width = tl.load(shapes_ptr + 2 * level + 1)
        start = tl.load(starts_ptr + level)
        dense = ((dense_levels >> level) & 1) == 1
        # span of level-local positions touched by this block (for the on-chip path)
        lo = tl.full((BLOCK_Q,), height * width, tl.int32)
        hi = tl.full((BLOCK_Q,), -1, tl.int32)
        # points in a loop (not unrolled): bounds the corner tiles live at once
        for point in range(POINTS):
            col = level * POINTS + point
            r00, fx, fy, attn, x_lo, x_hi, y_lo, y_hi = _sample_setup(
                loc_row + 2 * col, attn_row + col, q_mask, height, width
            )
            rows = start + r00
            hx = 1.0 - fx
            hy = 1.0 - fy
            m00 = y_lo & x_lo
            m01 = y_lo & x_hi
            m10 = y_hi & x_lo
            m11 = y_hi & x_hi
            # <grad_out, corner value> per query: all the location and weight gradients need
            g00 = tl.sum(g * _gather(value_base, rows, row_stride, d, m00, EVEN_D, CHANNELS), axis=1)
            g01 = tl.sum(g * _gather(value_base, rows + 1, row_stride, d, m01, EVEN_D, CHANNELS), axis=1)
            g10 = tl.sum(g * _gather(value_base, rows + width, row_stride, d, m10, EVEN_D, CHANNELS), axis=1)
            g11 = tl.sum(
                g * _gather(value_base, rows + width + 1, row_stride, d, m11, EVEN_D, CHANNELS), axis=1
            )
            grad_attn = hy * (hx * g00 + fx * g01) + fy * (hx * g10 + fx * g11)
            # d sample / d fx and d fy; d fx / d loc_x = W, d fy / d loc_y = H
            grad_fx = hy * (g01 - g00) + fy * (g11 - g10)
            grad_fy = hx * (g10 - g00) + fx * (g11 - g01)
            grad_attn = _round_to(grad_attn, grad_attn_ptr.dtype.element_ty, INTERPRETER)
            tl.store(grad_attn_ptr + qh * (LEVELS * POINTS) + col, grad_attn, mask=q_mask)
            grad_loc_row = grad_loc_ptr + qh * (LEVELS * POINTS * 2) + 2 * col
            tl.store(grad_loc_row, attn * width * grad_fx, mask=q_mask)
            tl.store(grad_loc_row + 1, attn * height * grad_fy, mask=q_mask)
            if HAS_DENSE and dense:
                touched = m00 | m01 | m10 | m11
                lo = tl.minimum(lo, tl.where(touched, tl.maximum(r00, 0), lo))
                hi = tl.maximum(hi, tl.where(touched, tl.minimum(r00 + width + 1, height * width - 1), hi))
            if HAS_ATOMIC and not dense:
                _scatter_add(grad_value_base, rows, row_stride, d, attn * hy * hx, g, m00, EVEN_D, CHANNELS)
                _scatter_add(
                    grad_value_base, rows + 1, row_stride, d, attn * hy * fx, g, m01, EVEN_D, CHANNELS
                )
                _scatter_add(
                    grad_value_base, rows + width, row_stride, d, attn * fy * hx, g, m10, EVEN_D, CHANNELS
                )
                _scatter_add(
                    grad_value_base,
                    rows + width + 1,
                    row_stride,
                    d,
                    attn * fy * fx,
                    g,
                    m11,
                    EVEN_D,
                    CHANNELS,
                )
        if HAS_DENSE and dense:
            _dense_value_grad(
                grad_value_base,
                loc_row,
                attn_row,
                q_mask,
                g,
                d,
                tl.min(lo, axis=0),
                tl.max(hi, axis=0),
                level,
                height,
                width,
                start,
                row_stride,
                CHANNELS,
                POINTS,
                BLOCK_Q,
                EVEN_D,
                DENSE_CHUNK,
                DOT_PRECISION,
            )


@functools.lru_cache(maxsize=LEVEL_TABLE_CACHE_SIZE)
def _level_tables(
    spatial_shapes: tuple[tuple[int, int], ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, 2) int32 ``(H, W)`` and (L,) int32 start offsets on ``device``, cached (no copy per call)."""
    starts = [0]
    for h, w in spatial_shapes[:-1]:
        starts.append(starts[-1] + h * w)
    return (
        torch.tensor(spatial_shapes, dtype=torch.int32, device=device),
        torch.tensor(starts, dtype=torch.int32, device=device),
    )


def _forward(
    value: torch.Tensor,
    spatial_shapes: tuple[tuple[int, int], ...],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    config: TritonConfig,
) -> torch.Tensor:
    batch, keys, heads, channels = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    out = torch.empty(batch, queries, heads * channels, dtype=value.dtype, device=value.device)
    if out.numel() == 0:
        return out
    shapes_t, starts_t = _level_tables(spatial_shapes, value.device)
    grid = (triton.cdiv(queries, config.block_q), heads, batch)
    _forward_kernel[grid](
        value,
        shapes_t,
        starts_t,
        sampling_locations,
        attention_weights,
        out,
        queries,
        keys,
        heads,
        CHANNELS=channels,
        LEVELS=levels,
        POINTS=points,
        BLOCK_Q=config.block_q,
        BLOCK_D=_block_d(channels),
        INTERPRETER=INTERPRETED,
        num_warps=config.num_warps,
    )
    return out


def _backward(
    grad_out: torch.Tensor,
    value: torch.Tensor,
    spatial_shapes: tuple[tuple[int, int], ...],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    config: TritonConfig,
    value_grad: bool,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Gradients of value (None unless ``value_grad``), sampling locations and attention weights."""
    batch, keys, heads, channels = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    # float32 accumulator of the scatter; rounded to the value dtype once, at the end
    grad_value = torch.zeros(value.shape, dtype=torch.float32, device=value.device) if value_grad else None
    grad_loc = torch.zeros_like(sampling_locations)
    grad_attn = torch.zeros_like(attention_weights)
    if grad_out.numel() == 0:
        return _value_dtype(grad_value, value.dtype), grad_loc, grad_attn
    shapes_t, starts_t = _level_tables(spatial_shapes, value.device)
    dense_levels = sum(
        1 << level for level, (h, w) in enumerate(spatial_shapes) if h * w <= config.dense_max_positions
    )
    grid = (triton.cdiv(queries, config.block_q), heads, batch)
    _backward_kernel[grid](
        value,
        shapes_t,
        starts_t,
        sampling_locations,
        attention_weights,
        grad_out,
        grad_value if value_grad else grad_loc,  # never written when no value gradient is wanted
        grad_loc,
        grad_attn,
        queries,
        keys,
        heads,
        dense_levels,
        CHANNELS=channels,
        LEVELS=levels,
        POINTS=points,
        BLOCK_Q=config.block_q,
        BLOCK_D=_block_d(channels),
        HAS_ATOMIC=value_grad and dense_levels != (1 << levels) - 1,
        HAS_DENSE=value_grad and dense_levels != 0,
        DENSE_CHUNK=config.dense_chunk,
        # float32 values: exact float32 products; low-precision values: tf32 (10-bit mantissa) is
        # finer than the bf16/fp16 rounding of the returned gradient
        DOT_PRECISION="ieee" if value.dtype == torch.float32 else "tf32",
        INTERPRETER=INTERPRETED,
        num_warps=config.num_warps,
    )
    return _value_dtype(grad_value, value.dtype), grad_loc, grad_attn


def _value_dtype(grad_value: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if grad_value is None else grad_value.to(dtype)


class _MSDeformAttnTriton(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        value: torch.Tensor,
        spatial_shapes: tuple[tuple[int, int], ...],
        sampling_locations: torch.Tensor,
        attention_weights: torch.Tensor,
        forward_config: TritonConfig,
        backward_config: TritonConfig,
    ) -> torch.Tensor:
        ctx.save_for_backward(value, sampling_locations, attention_weights)
        ctx.spatial_shapes = spatial_shapes
        ctx.backward_config = backward_config
        return _forward(value, spatial_shapes, sampling_locations, attention_weights, forward_config)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        value, sampling_locations, attention_weights = ctx.saved_tensors
        need_value, _, need_loc, need_attn, _, _ = ctx.needs_input_grad
        grad_value, grad_loc, grad_attn = _backward(
            grad_out.contiguous(),
            value,
            ctx.spatial_shapes,
            sampling_locations,
            attention_weights,
            ctx.backward_config,
            value_grad=need_value,
        )
        return (
            grad_value,
            None,
            grad_loc if need_loc else None,
            grad_attn if need_attn else None,
            None,
            None,
        )


def ms_deform_attn_triton(
    value: torch.Tensor,
    spatial_shapes: Sequence[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    *,
    forward_config: TritonConfig | None = None,
    backward_config: TritonConfig | None = None,
) -> torch.Tensor:
    """Multi-scale deformable attention with the Triton kernels (differentiable).

    Inputs are validated by :func:`cuda_ops.ms_deform_attn`; call it with ``backend="triton"``
    rather than this function, unless tuning the launch parameters.

    Args:
        value: (B, S, M, D) float32/bfloat16/float16 values, ``S = sum(H_l * W_l)``.
        spatial_shapes: L pairs ``(H_l, W_l)`` of Python ints.
        sampling_locations: (B, Q, M, L, P, 2) normalised (x, y) locations; float64 is rounded
            to float32 as the reference does for these value dtypes.
        attention_weights: (B, Q, M, L, P), already normalised over L*P by the caller.
        forward_config: launch parameters of the forward kernel; default
            :func:`forward_config_default` of the channels per head.
        backward_config: launch parameters of the backward kernel; default
            :func:`backward_config_default` of the channels per head.

    Returns:
        (B, Q, M * D) in the dtype of ``value``.

    Raises:
        ValueError: a value dtype other than float32/bfloat16/float16, or inputs on different devices.
    """
    if value.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"the triton backend supports values of {SUPPORTED_DTYPES}, got {value.dtype}")
    devices = {value.device, sampling_locations.device, attention_weights.device}
    if len(devices) != 1:
        raise ValueError(
            f"value, sampling_locations and attention_weights must share one device, got {devices}"
        )
    shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
    channels = value.shape[-1]
    return _MSDeformAttnTriton.apply(
        value.contiguous(),
        shapes,
        sampling_locations.to(torch.float32).contiguous(),
        attention_weights.contiguous(),
        forward_config or forward_config_default(channels),
        backward_config or backward_config_default(channels),
    )


# ---------------------------------------------------------------------------------------------
# Parity self-check: what ``backend="auto"`` runs once per device and dtype before using this
# backend. Relative L2 error against the reference in float64, per output; the float32 bound is
# far above float32 rounding (about 1e-7 here), the low-precision ones a few units of the
# rounding of the returned tensors (bf16: 2**-9, fp16: 2**-12 relative).
SELF_CHECK_TOLERANCES = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
SELF_CHECK_SHAPES = ((9, 7), (4, 6), (2, 3))  # non-square levels, odd sizes
SELF_CHECK_SEED = 0
# pixel coordinates keep this far from integers: there the bilinear derivative jumps, and
# float rounding may put the two implementations on different sides
SELF_CHECK_INTEGER_MARGIN = 0.02
_SELF_CHECK_VERDICTS: dict[tuple[str, int | None, torch.dtype], bool] = {}


def _self_check_inputs(
    dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A small random case: value, locations (inside, near and outside borders), weights, grad_out."""
    gen = torch.Generator().manual_seed(SELF_CHECK_SEED)
    batch, queries, heads, channels, points = 2, 37, 2, 32, 3
    levels = len(SELF_CHECK_SHAPES)
    length = sum(h * w for h, w in SELF_CHECK_SHAPES)
    value = torch.randn(batch, length, heads, channels, generator=gen, dtype=torch.float64)
    # (L, 2) sizes as (W, H) to match the (x, y) order of the locations
    sizes = torch.tensor([(w, h) for h, w in SELF_CHECK_SHAPES], dtype=torch.float64)[:, None, :]
    shape = (batch, queries, heads, levels, points, 2)
    # pixel coordinate = integer in [-2, size] + fraction away from 0 and 1, so some corners fall outside
    whole = torch.floor(torch.rand(shape, generator=gen, dtype=torch.float64) * (sizes + 3)) - 2
    frac = SELF_CHECK_INTEGER_MARGIN + (1 - 2 * SELF_CHECK_INTEGER_MARGIN) * torch.rand(
        shape, generator=gen, dtype=torch.float64
    )
    locations = (whole + frac + 0.5) / sizes
    weights = torch.rand(shape[:-1], generator=gen, dtype=torch.float64)
    weights = weights / weights.sum(dim=(-1, -2), keepdim=True)
    grad_out = torch.randn(batch, queries, heads * channels, generator=gen, dtype=torch.float64)
    return (
        value.to(device=device, dtype=dtype),
        locations.to(device=device, dtype=torch.float32),
        weights.to(device=device, dtype=dtype),
        grad_out.to(device=device, dtype=dtype),
    )


def parity_errors(
    device: torch.device, dtype: torch.dtype, *, backward_config: TritonConfig | None = None
) -> dict[str, float]:
    """Relative L2 errors of output and gradients against the float64 reference, on a small case.

    Returns:
        ``{"output", "grad_value", "grad_locations", "grad_weights"}`` to errors.
    """
    value, locations, weights, grad_out = _self_check_inputs(dtype, device)
    results = []
    for fn, cast in (
        (functools.partial(ms_deform_attn_triton, backward_config=backward_config), None),
        (ms_deform_attn_pytorch, torch.float64),
    ):
        inputs = [t.to(cast) if cast else t.clone() for t in (value, locations, weights)]
        for t in inputs:
            t.requires_grad_(True)
        out = fn(inputs[0], SELF_CHECK_SHAPES, inputs[1], inputs[2])
        grads = torch.autograd.grad(out, inputs, grad_out.to(out.dtype))
        results.append([out.detach(), *grads])
    names = ("output", "grad_value", "grad_locations", "grad_weights")
    return {
        name: ((ours.double() - ref).norm() / ref.norm().clamp_min(torch.finfo(torch.float64).tiny)).item()
        for name, ours, ref in zip(names, *results, strict=True)
    }


def _run_self_check(device: torch.device, dtype: torch.dtype) -> bool:
    tolerance = SELF_CHECK_TOLERANCES[dtype]
    paths = {
        "on-chip value gradient": backward_config_default(32),
        "atomic value gradient": replace(backward_config_default(32), dense_max_positions=0),
    }
    # the first auto call may come from an evaluation loop: inference mode, no grad, autocast
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
        for path, config in paths.items():
            errors = parity_errors(device, dtype, backward_config=config)
            worst = max(errors, key=errors.__getitem__)
            if not errors[worst] <= tolerance:  # also false for NaN
                log.warning(
                    "triton ms_deform_attn failed its parity self-check on %s %s (%s): relative error of "
                    "%s %.3g > %.1g; backend='auto' keeps using the reference here",
                    device,
                    dtype,
                    path,
                    worst,
                    errors[worst],
                    tolerance,
                )
                return False
    log.info("triton ms_deform_attn passed its parity self-check on %s %s", device, dtype)
    return True


def passes_self_check(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the kernels match the reference on ``device`` for ``dtype`` values (cached).

    Runs once per (device, dtype): forward and backward on a small random case, through both
    value-gradient paths. A failure, an error included (a kernel that does not compile, say), is
    logged as a warning and cached, so ``backend="auto"`` keeps the reference there.
    """
    key = (device.type, device.index, dtype)
    verdict = _SELF_CHECK_VERDICTS.get(key)
    if verdict is None:
        if dtype not in SUPPORTED_DTYPES:
            verdict = False
        else:
            try:
                verdict = _run_self_check(device, dtype)
            # any failure of the check (compilation, launch, out of memory) must leave auto on the
            # reference, and is reported, not hidden
            except Exception:
                log.warning(
                    "triton ms_deform_attn self-check raised on %s %s; backend='auto' keeps using the "
                    "reference here",
                    device,
                    dtype,
                    exc_info=True,
                )
                verdict = False
        _SELF_CHECK_VERDICTS[key] = verdict
    return verdict
