"""The Triton deformable-attention backend: parity with the reference, and the dispatch rules.

Without CUDA the kernels run on CPU tensors through the Triton interpreter: ``TRITON_INTERPRET=1``
is set below before triton is first imported (the interpreter decides when a kernel is defined).
It is slow (about a second per small case), so the default run keeps few, small cases; the full
grid of shapes is marked ``gpu``. Skipped as a whole when triton is not installed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

import cuda_ops
from cuda_ops import TRITON_BACKEND, available_backends, ms_deform_attn
from cuda_ops import triton_backend as tb
from cuda_ops.reference import ms_deform_attn_pytorch

DEVICE = torch.device("cuda" if torch.cuda.is_available() and not tb.INTERPRETED else "cpu")
REPO_ROOT = Path(__file__).resolve().parents[2]
# relative L2 error against the float64 reference: float32 rounding is about 1e-7; bf16 and fp16
# outputs are rounded once (2**-9 and 2**-12 relative)
TOLERANCES = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
# the largest single error may exceed the L2 one by this factor (relative to the largest reference entry)
MAX_ERROR_FACTOR = 10
ALL_ATOMIC = 0  # dense_max_positions that sends every level through the atomic value gradient
PROBED_TARGETS = 40  # blocks in the chunk-edge test (the interpreter runs one program per block)
NAMES = ("output", "grad_value", "grad_locations", "grad_weights")
Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _random_case(
    shapes: Sequence[tuple[int, int]],
    *,
    batch: int,
    queries: int,
    heads: int,
    channels: int,
    points: int,
    dtype: torch.dtype,
    seed: int,
    device: torch.device = DEVICE,
) -> Inputs:
    """Value, locations, weights and grad_out; locations inside, near and outside the borders.

    Pixel coordinates are an integer in [-2, size] plus a fraction in [0.02, 0.98]: away from the
    integers, where the bilinear derivative jumps (exact integers are tested separately).
    """
    gen = torch.Generator().manual_seed(seed)
    levels = len(shapes)
    length = sum(h * w for h, w in shapes)
    value = torch.randn(batch, length, heads, channels, generator=gen, dtype=torch.float64)
    sizes = torch.tensor([(w, h) for h, w in shapes], dtype=torch.float64)[:, None, :]  # (L, 1, 2) as (x, y)
    shape = (batch, queries, heads, levels, points, 2)
    whole = torch.floor(torch.rand(shape, generator=gen, dtype=torch.float64) * (sizes + 3)) - 2
    frac = 0.02 + 0.96 * torch.rand(shape, generator=gen, dtype=torch.float64)
    locations = (whole + frac + 0.5) / sizes
    weights = torch.rand(shape[:-1], generator=gen, dtype=torch.float64)
    weights = weights / weights.sum(dim=(-1, -2), keepdim=True)
    grad_out = torch.randn(batch, queries, heads * channels, generator=gen, dtype=torch.float64)
    return (
        value.to(device, dtype),
        locations.to(device, torch.float32),
        weights.to(device, dtype),
        grad_out.to(device, dtype),
    )


def _run(fn: Callable[..., torch.Tensor], shapes: Sequence[tuple[int, int]], inputs: Inputs, cast=None):
    value, locations, weights, grad_out = inputs
    leaves = [(t.to(cast) if cast else t.clone()).requires_grad_(True) for t in (value, locations, weights)]
    out = fn(leaves[0], shapes, leaves[1], leaves[2])
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    return [out.detach(), *grads]


def _assert_parity(
    shapes: Sequence[tuple[int, int]], inputs: Inputs, *, backward_config: tb.TritonConfig | None = None
) -> None:
    """Forward and all three gradients of the triton backend match the float64 reference."""
    dtype = inputs[0].dtype

    def triton_fn(*args: object) -> torch.Tensor:
        return tb.ms_deform_attn_triton(*args, backward_config=backward_config)

    ours = _run(triton_fn, shapes, inputs)
    reference = _run(ms_deform_attn_pytorch, shapes, inputs, cast=torch.float64)
    assert ours[0].dtype == dtype and ours[1].dtype == dtype and ours[2].dtype == torch.float32
    for name, a, ref in zip(NAMES, ours, reference, strict=True):
        assert a.shape == ref.shape, name
        assert torch.isfinite(a).all(), name
        error = (a.double() - ref).norm() / ref.norm()
        largest = (a.double() - ref).abs().max() / ref.abs().max()
        assert error <= TOLERANCES[dtype], f"{name}: relative L2 error {error:.3g}"
        assert largest <= MAX_ERROR_FACTOR * TOLERANCES[dtype], f"{name}: largest error {largest:.3g}"


# ---------------------------------------------------------------------------------------------
# Parity, small cases (interpreter on CPU; also run as they are on a GPU)


@pytest.mark.parametrize(
    ("shapes", "dtype", "channels", "heads", "points", "dense_max"),
    [
        # three non-square levels, every value gradient on chip, then every one through atomics
        ([(6, 5), (3, 4), (2, 2)], torch.float32, 32, 2, 2, tb.DENSE_MAX_POSITIONS),
        ([(6, 5), (3, 4), (2, 2)], torch.float32, 32, 2, 2, ALL_ATOMIC),
        # mixed: the 6x5 level through atomics, the others on chip
        ([(6, 5), (3, 4), (2, 2)], torch.bfloat16, 32, 1, 3, 16),
        ([(8, 4)], torch.bfloat16, 64, 2, 2, tb.DENSE_MAX_POSITIONS),
        ([(5, 7), (2, 3)], torch.float16, 32, 1, 4, ALL_ATOMIC),
        # channels not a power of two: masked channel lanes
        ([(4, 6)], torch.float32, 20, 1, 2, tb.DENSE_MAX_POSITIONS),
    ],
)
def test_parity_small(
    shapes: list[tuple[int, int]], dtype: torch.dtype, channels: int, heads: int, points: int, dense_max: int
) -> None:
    inputs = _random_case(
        shapes,
        batch=2,
        queries=19,
        heads=heads,
        channels=channels,
        points=points,
        dtype=dtype,
        seed=len(shapes),
    )
    config = tb.TritonConfig(
        block_q=tb.BACKWARD_BLOCK_Q, num_warps=tb.FORWARD_WARPS, dense_max_positions=dense_max
    )
    _assert_parity(shapes, inputs, backward_config=config)


def test_parity_queries_over_several_blocks() -> None:
    """More queries than one block, the last block partial, on both value-gradient paths."""
    shapes = [(4, 5), (2, 3)]
    queries = 2 * tb.BACKWARD_BLOCK_Q + 7
    inputs = _random_case(
        shapes, batch=1, queries=queries, heads=1, channels=32, points=2, dtype=torch.float32, seed=3
    )
    for dense_max in (tb.DENSE_MAX_POSITIONS, ALL_ATOMIC):
        config = tb.TritonConfig(block_q=tb.BACKWARD_BLOCK_Q, num_warps=4, dense_max_positions=dense_max)
        _assert_parity(shapes, inputs, backward_config=config)


def _border_locations(size: int) -> list[float]:
    """Normalised coordinates whose pixel coordinate is exactly -1.5, -1, -0.5, 0, 1, size-1, ...

    Sizes are powers of two, so every product ``loc * size - 0.5`` is exact in float32 and in the
    reference: both sides floor the same integers, where the bilinear derivative jumps.
    """
    pixels = [-1.5, -1.0, -0.5, 0.0, 1.0, size - 1.0, size - 0.5, size, size + 0.5]
    return [(p + 0.5) / size for p in pixels]


def test_parity_on_the_borders() -> None:
    """Locations exactly on the map borders, pixel centres and one pixel outside: value and grads."""
    shapes = [(4, 8), (2, 4)]  # non-square, powers of two
    xs = torch.tensor([_border_locations(w) for _, w in shapes], dtype=torch.float64)  # (L, 9)
    ys = torch.tensor([_border_locations(h) for h, _ in shapes], dtype=torch.float64)  # (L, 9)
    # every (x, y) pair: (L, 81, 2) -> (B=1, Q=81, M=1, L, P=1, 2)
    grid = torch.stack(torch.broadcast_tensors(xs[:, :, None], ys[:, None, :]), dim=-1).flatten(1, 2)
    locations = grid.permute(1, 0, 2)[None, :, None, :, None, :].float()
    queries = locations.shape[1]
    gen = torch.Generator().manual_seed(5)
    value = torch.randn(1, sum(h * w for h, w in shapes), 1, 32, generator=gen)
    weights = torch.rand(1, queries, 1, len(shapes), 1, generator=gen)
    grad_out = torch.randn(1, queries, 32, generator=gen)
    inputs = tuple(t.to(DEVICE) for t in (value, locations, weights, grad_out))
    for dense_max in (tb.DENSE_MAX_POSITIONS, ALL_ATOMIC):
        config = tb.TritonConfig(block_q=128, num_warps=4, dense_max_positions=dense_max)
        _assert_parity(shapes, inputs, backward_config=config)


def test_on_chip_spans_at_chunk_edges() -> None:
    """The on-chip value gradient visits exactly the chunks a block touches.

    Each block of queries samples around one corner pixel, so its span of positions is narrow; the
    targets are every pixel of a 7x10 level (-1 included), so spans start and end at every offset
    within the 16-position chunks (10 does not divide 16).
    """
    height, width, block = 7, 10, 16
    shapes = [(height, width)]
    gen = torch.Generator().manual_seed(13)
    targets = torch.cartesian_prod(torch.arange(-1.0, height), torch.arange(-1.0, width))  # (T, 2) as (y, x)
    targets = targets[torch.randperm(len(targets), generator=gen)[:PROBED_TARGETS]]
    # (T, block, 2) pixel coordinates (x, y): target corner + fraction, then normalised
    frac = 0.02 + 0.96 * torch.rand(len(targets), block, 2, generator=gen, dtype=torch.float64)
    pixels = targets.flip(-1).double()[:, None, :] + frac
    locations = ((pixels + 0.5) / torch.tensor([width, height], dtype=torch.float64)).reshape(
        1, -1, 1, 1, 1, 2
    )
    queries = locations.shape[1]
    value = torch.randn(1, height * width, 1, 32, generator=gen)
    weights = torch.rand(1, queries, 1, 1, 1, generator=gen)
    grad_out = torch.randn(1, queries, 32, generator=gen)
    inputs = tuple(t.to(DEVICE) for t in (value, locations.float(), weights, grad_out))
    config = tb.TritonConfig(block_q=block, num_warps=4, dense_chunk=block)
    _assert_parity(shapes, inputs, backward_config=config)


def test_only_requested_gradients() -> None:
    """A value that needs no gradient gets none (and the kernel skips the value scatter)."""
    shapes = [(3, 4)]
    value, locations, weights, grad_out = _random_case(
        shapes, batch=1, queries=5, heads=1, channels=32, points=2, dtype=torch.float32, seed=7
    )
    locations.requires_grad_(True)
    out = ms_deform_attn(value, shapes, locations, weights, backend=TRITON_BACKEND)
    (grad_loc,) = torch.autograd.grad(out, [locations], grad_out)
    expected = _run(ms_deform_attn_pytorch, shapes, (value, locations.detach(), weights, grad_out))[2]
    torch.testing.assert_close(grad_loc, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Self-check and dispatch


@pytest.fixture
def fresh_verdicts(monkeypatch: pytest.MonkeyPatch) -> dict:
    verdicts: dict = {}
    monkeypatch.setattr(tb, "_SELF_CHECK_VERDICTS", verdicts)
    return verdicts


def test_self_check_passes_once_and_is_cached(fresh_verdicts: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    # the first auto call may come from an evaluation loop
    with torch.inference_mode(), torch.autocast(DEVICE.type, enabled=True):
        assert tb.passes_self_check(DEVICE, torch.bfloat16)
    assert fresh_verdicts == {(DEVICE.type, DEVICE.index, torch.bfloat16): True}

    def must_not_run(*args: object) -> bool:
        raise AssertionError("the verdict is cached")

    monkeypatch.setattr(tb, "_run_self_check", must_not_run)
    assert tb.passes_self_check(DEVICE, torch.bfloat16)


def _off_by_one_percent(value, shapes, locations, weights, **kwargs):
    return ms_deform_attn_pytorch(value, shapes, locations, weights) * 1.01


def _raises(*args, **kwargs):
    raise RuntimeError("kernel failed to compile")


@pytest.mark.parametrize("broken", [_off_by_one_percent, _raises])
def test_failed_self_check_is_logged_cached_and_auto_keeps_the_reference(
    broken: Callable[..., torch.Tensor],
    fresh_verdicts: dict,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(tb, "ms_deform_attn_triton", broken)
    monkeypatch.setattr(cuda_ops, "_TRITON_AUTO_DEVICE_TYPES", (DEVICE.type,))
    shapes = [(3, 4)]
    value, locations, weights, _ = _random_case(
        shapes, batch=1, queries=4, heads=1, channels=32, points=2, dtype=torch.float32, seed=8
    )
    with caplog.at_level(logging.WARNING, logger=tb.__name__):
        out = ms_deform_attn(value, shapes, locations, weights)
    assert "self-check" in caplog.text and "keeps using the reference" in caplog.text
    assert fresh_verdicts[(DEVICE.type, DEVICE.index, torch.float32)] is False
    torch.testing.assert_close(out, ms_deform_attn(value, shapes, locations, weights, backend="pytorch"))
    # explicitly asked for, it still runs (the user chose it)
    if broken is _off_by_one_percent:
        explicit = ms_deform_attn(value, shapes, locations, weights, backend=TRITON_BACKEND)
        assert not torch.equal(explicit, out)


def test_auto_picks_triton_only_when_verified(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def spy(value, shapes, locations, weights, **kwargs):
        calls.append(1)
        return ms_deform_attn_pytorch(value, shapes, locations, weights)

    monkeypatch.setattr(tb, "ms_deform_attn_triton", spy)
    monkeypatch.setattr(cuda_ops, "_TRITON_AUTO_DEVICE_TYPES", (DEVICE.type,))
    shapes = [(3, 4)]
    value, locations, weights, _ = _random_case(
        shapes, batch=1, queries=4, heads=1, channels=32, points=2, dtype=torch.float32, seed=9
    )
    verdict = {"value": False}
    monkeypatch.setattr(tb, "passes_self_check", lambda device, dtype: verdict["value"])
    ms_deform_attn(value, shapes, locations, weights)
    assert calls == []
    verdict["value"] = True
    ms_deform_attn(value, shapes, locations, weights)
    assert calls == [1]


def test_auto_never_uses_the_interpreter(fresh_verdicts: dict) -> None:
    """On CPU the backend may be available (interpreter) but auto does not run it or its check."""
    value = torch.zeros(1, 12, 1, 32)
    if tb.INTERPRETED:
        assert TRITON_BACKEND in available_backends(value)
    assert not cuda_ops._triton_self_check(value)
    assert fresh_verdicts == {}


def test_explicit_unavailable_triton_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    shapes = [(3, 4)]
    value, locations, weights, _ = _random_case(
        shapes,
        batch=1,
        queries=4,
        heads=1,
        channels=32,
        points=2,
        dtype=torch.float32,
        seed=10,
        device=torch.device("cpu"),
    )
    with pytest.raises(RuntimeError, match=r"'triton' is unavailable .*supports values of"):
        ms_deform_attn(value.double(), shapes, locations, weights.double(), backend=TRITON_BACKEND)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ms_deform_attn(value, shapes, locations, weights, backend=TRITON_BACKEND)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(cuda_ops.importlib.util, "find_spec", lambda name: None)
    cuda_ops._triton_import_problem.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="triton is not installed"):
            ms_deform_attn(value, shapes, locations, weights, backend=TRITON_BACKEND)
    finally:
        cuda_ops._triton_import_problem.cache_clear()


def test_cuda_ops_imports_without_triton() -> None:
    """Importing cuda_ops never imports triton, and works when triton cannot be imported at all."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, cuda_ops\n"
        "assert 'cuda_ops.triton_backend' not in sys.modules\n"
        "print(cuda_ops.available_backends(torch.zeros(1, 4, 1, 8)))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['pytorch']"


def _without_interpreter() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def test_benchmark_cpu_smoke(tmp_path: Path) -> None:
    """The kernel benchmark's --cpu-smoke mode runs and writes its results file."""
    out = tmp_path / "smoke.json"
    script = REPO_ROOT / "benchmarks" / "ms_deform_attn" / "bench_kernel.py"
    done = subprocess.run(
        [sys.executable, script, "--cpu-smoke", "--out", out],
        cwd=REPO_ROOT,
        env=_without_interpreter(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())
    assert results["meta"]["device"] == "cpu" and results["meta"]["command"]
    assert {row["backend"] for row in results["rows"]} == {"pytorch"}
    assert all(row["forward+backward"]["ms"] > 0 for row in results["rows"])


@pytest.mark.slow
def test_kernels_compile_for_hopper() -> None:
    """Both kernels compile for sm_90 (no GPU needed: ptxas ships with triton), without spills."""
    report = REPO_ROOT / "benchmarks" / "ms_deform_attn" / "compile_report.py"
    done = subprocess.run(
        [sys.executable, report, "--shapes", "extractor-B", "--dtypes", "bfloat16", "--json", "/dev/stdout"],
        cwd=REPO_ROOT,
        env=_without_interpreter(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    kernels = json.loads(done.stdout[done.stdout.index("{") :])["kernels"]
    assert {k["kernel"] for k in kernels} == {"forward", "backward"}
    assert all(k["LDL"] == 0 and k["STL"] == 0 and k["stack"] == 0 for k in kernels)


# ---------------------------------------------------------------------------------------------
# The full grid, compiled, on a GPU

GPU_LEVELS = [
    [(16, 16)],
    [(12, 20), (6, 10)],  # non-square
    [(32, 32), (16, 16), (8, 8)],  # the injector's pyramid at crop 256
    [(40, 30), (20, 15), (10, 8)],  # first level above DENSE_MAX_POSITIONS: atomics and on-chip mixed
]


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs CUDA (compiled kernels)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shapes", GPU_LEVELS)
@pytest.mark.parametrize("channels", [32, 64])
@pytest.mark.parametrize(("batch", "heads", "points"), [(1, 1, 1), (3, 8, 4)])
def test_parity_grid_gpu(
    dtype: torch.dtype, shapes: list[tuple[int, int]], channels: int, batch: int, heads: int, points: int
) -> None:
    inputs = _random_case(
        shapes, batch=batch, queries=300, heads=heads, channels=channels, points=points, dtype=dtype, seed=11
    )
    _assert_parity(shapes, inputs)
    atomic = dataclasses.replace(tb.backward_config_default(channels), dense_max_positions=ALL_ATOMIC)
    _assert_parity(shapes, inputs, backward_config=atomic)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs CUDA (compiled kernels)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_auto_picks_triton_on_cuda(dtype: torch.dtype, fresh_verdicts: dict) -> None:
    shapes = [(8, 8)]
    value, locations, weights, _ = _random_case(
        shapes, batch=1, queries=4, heads=1, channels=32, points=2, dtype=dtype, seed=12
    )
    assert cuda_ops._triton_self_check(value)
    out = ms_deform_attn(value.requires_grad_(True), shapes, locations, weights)
    assert "Triton" in type(out.grad_fn).__name__  # the backward node of the triton autograd function
    assert fresh_verdicts == {(DEVICE.type, DEVICE.index, dtype): True}
