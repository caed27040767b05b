"""Multi-scale deformable attention: the reference sampling rule, gradients, dtypes and dispatch."""

from __future__ import annotations

import pytest
import torch

from cuda_ops import available_backends, ms_deform_attn, register_backend
from cuda_ops.dispatch import Backend


def _single(value_map: torch.Tensor, loc: tuple[float, float]) -> float:
    """Sample one (H, W) map of one channel at one normalised (x, y) location with weight 1."""
    h, w = value_map.shape
    value = value_map.reshape(1, h * w, 1, 1)
    locations = torch.tensor(loc, dtype=torch.float64).reshape(1, 1, 1, 1, 1, 2)
    weights = torch.ones(1, 1, 1, 1, 1, dtype=torch.float64)
    return ms_deform_attn(value.double(), [(h, w)], locations, weights).item()


MAP = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])  # H=2, W=3


@pytest.mark.parametrize(
    ("loc", "expected"),
    [
        # pixel coordinate = loc * size - 0.5: (0.5, 0.5) -> x 1.0, y 0.5: halfway between 2 and 5
        ((0.5, 0.5), 3.5),
        # pixel centre of (row 1, col 2): x = (2 + 0.5) / 3, y = (1 + 0.5) / 2
        ((2.5 / 3, 0.75), 6.0),
        # top-left corner: x = y = -0.5, only the (0, 0) corner is inside, weight 0.25
        ((0.0, 0.0), 0.25),
        # right border x = 1 -> 2.5: half of column 2, y at row-0 centre
        ((1.0, 0.25), 1.5),
        # x = 1/3 -> 0.5, y = 0.25 -> 0: between columns 0 and 1 of row 0
        ((1.0 / 3.0, 0.25), 1.5),
        # fully outside: zero padding
        ((1.5, 0.5), 0.0),
        ((-0.4, 0.5), 0.0),
        ((0.5, 1.3), 0.0),
    ],
)
def test_hand_computed_bilinear_sampling(loc: tuple[float, float], expected: float) -> None:
    assert _single(MAP, loc) == pytest.approx(expected, abs=1e-12)


def test_hand_computed_weighted_heads_and_levels() -> None:
    """Two heads, two levels (one non-square), two points: weights combine samples per head."""
    level0 = torch.arange(6, dtype=torch.float64).reshape(2, 3)  # (H=2, W=3)
    level1 = torch.tensor([[10.0, 20.0]])  # (H=1, W=2)
    # per head: head 0 sees the maps, head 1 sees them negated; one channel per head
    flat = torch.cat([level0.flatten(), level1.flatten()])  # (S=8,)
    value = torch.stack([flat, -flat], dim=-1).reshape(1, 8, 2, 1)
    # (B=1, Q=1, M=2, L=2, P=2, 2)
    loc = torch.zeros(1, 1, 2, 2, 2, 2, dtype=torch.float64)
    loc[..., 0, 0, :] = torch.tensor([0.5 / 3, 0.25])  # level 0 pixel (0, 0) -> 0
    loc[..., 0, 1, :] = torch.tensor([2.5 / 3, 0.75])  # level 0 pixel (1, 2) -> 5
    loc[..., 1, 0, :] = torch.tensor([0.75, 0.5])  # level 1 pixel (0, 1) -> 20
    loc[..., 1, 1, :] = torch.tensor([0.5, 0.5])  # level 1 between 10 and 20 -> 15
    weights = (
        torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64).reshape(1, 1, 1, 2, 2).expand(1, 1, 2, 2, 2)
    )
    out = ms_deform_attn(value, [(2, 3), (1, 2)], loc, weights)
    expected = 0.1 * 0 + 0.2 * 5 + 0.3 * 20 + 0.4 * 15
    assert out.shape == (1, 1, 2)
    torch.testing.assert_close(out, torch.tensor([[[expected, -expected]]], dtype=torch.float64))


def _random_inputs(dtype: torch.dtype, shapes: list[tuple[int, int]], *, seed: int = 0, queries: int = 5):
    gen = torch.Generator().manual_seed(seed)
    batch, heads, channels, points = 2, 3, 4, 2
    length = sum(h * w for h, w in shapes)
    value = torch.randn(batch, length, heads, channels, generator=gen, dtype=torch.float64).to(dtype)
    # locations spread beyond [0, 1] so that some points fall outside and on the borders
    loc = (
        torch.rand(batch, queries, heads, len(shapes), points, 2, generator=gen, dtype=torch.float64) * 1.4
        - 0.2
    )
    weights = torch.rand(batch, queries, heads, len(shapes), points, generator=gen, dtype=torch.float64)
    weights = (weights / weights.sum(dim=(-1, -2), keepdim=True)).to(dtype)
    return value, loc, weights


def test_gradcheck_float64_non_square_levels() -> None:
    shapes = [(4, 6), (3, 2), (1, 5)]
    value, loc, weights = _random_inputs(torch.float64, shapes)
    value.requires_grad_(True)
    loc.requires_grad_(True)
    weights.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda v, sl, aw: ms_deform_attn(v, shapes, sl, aw, backend="pytorch"),
        (value, loc, weights),
        eps=1e-6,
        atol=1e-5,
    )


def test_points_outside_contribute_nothing() -> None:
    shapes = [(4, 4)]
    value, loc, weights = _random_inputs(torch.float64, shapes)
    inside = ms_deform_attn(value, shapes, loc, weights)
    # add a point far outside every map with a large weight: output unchanged
    far = torch.full_like(loc[..., :1, :], 5.0)
    out = ms_deform_attn(
        value,
        shapes,
        torch.cat([loc, far], dim=-2),
        torch.cat([weights, torch.ones_like(weights[..., :1])], dim=-1),
    )
    torch.testing.assert_close(out, inside)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_values_match_float32(dtype: torch.dtype) -> None:
    shapes = [(8, 12), (4, 6), (2, 3)]
    value, loc, weights = _random_inputs(torch.float32, shapes, queries=50)
    reference = ms_deform_attn(value, shapes, loc.float(), weights)
    low = ms_deform_attn(value.to(dtype), shapes, loc.float(), weights.to(dtype))
    assert low.dtype == dtype
    # only the rounding of the inputs and of the output: a few units of the dtype's epsilon
    tol = 4 * torch.finfo(dtype).eps * reference.abs().max().item() + 2 * torch.finfo(dtype).eps
    torch.testing.assert_close(low.float(), reference, atol=tol * 4, rtol=0)
    # and it differs from the float32 result by more than nothing (the dtype is really used)
    assert not torch.equal(low.float(), reference)


def test_low_precision_values_are_differentiable() -> None:
    shapes = [(4, 4), (2, 2)]
    value, loc, weights = _random_inputs(torch.float32, shapes)
    value = value.bfloat16().requires_grad_(True)
    loc = loc.float().requires_grad_(True)
    weights = weights.bfloat16().requires_grad_(True)
    ms_deform_attn(value, shapes, loc, weights).float().square().sum().backward()
    assert value.grad is not None and value.grad.dtype == torch.bfloat16
    assert loc.grad is not None and loc.grad.dtype == torch.float32 and loc.grad.abs().sum() > 0
    assert weights.grad is not None and weights.grad.abs().sum() > 0


def test_low_precision_locations_are_rejected() -> None:
    shapes = [(4, 4)]
    value, loc, weights = _random_inputs(torch.float32, shapes)
    with pytest.raises(ValueError, match="sampling_locations must be float32"):
        ms_deform_attn(value, shapes, loc.bfloat16(), weights)


def test_shape_errors_name_the_values() -> None:
    value, loc, weights = _random_inputs(torch.float32, [(4, 4)])
    with pytest.raises(ValueError, match=r"\[\(4, 5\)\] cover 20 positions but value has 16"):
        ms_deform_attn(value, [(4, 5)], loc, weights)
    with pytest.raises(TypeError, match="Python ints"):
        ms_deform_attn(value, torch.tensor([[4, 4]]), loc, weights)
    with pytest.raises(ValueError, match="attention_weights"):
        ms_deform_attn(value, [(4, 4)], loc, weights[..., :1])


def test_dispatch_explicit_backends() -> None:
    value, loc, weights = _random_inputs(torch.float32, [(4, 4)])
    with pytest.raises(ValueError, match="unknown ms_deform_attn backend 'nope'"):
        ms_deform_attn(value, [(4, 4)], loc, weights, backend="nope")
    register_backend(
        Backend(name="never", fn=lambda *a: a[0], is_available=lambda v: "needs a device that does not exist")
    )
    try:
        assert "never" in available_backends()
        assert "never" not in available_backends(value)
        with pytest.raises(RuntimeError, match="'never' is unavailable for these inputs: needs a device"):
            ms_deform_attn(value, [(4, 4)], loc, weights, backend="never")
        # auto never picks an unavailable backend
        torch.testing.assert_close(
            ms_deform_attn(value, [(4, 4)], loc, weights),
            ms_deform_attn(value, [(4, 4)], loc, weights, backend="pytorch"),
        )
    finally:
        from cuda_ops import dispatch

        dispatch._BACKENDS.pop("never")
    with pytest.raises(ValueError, match="reference"):
        register_backend(Backend(name="pytorch", fn=lambda *a: a[0], is_available=lambda v: None))


def test_auto_skips_unverified_backends() -> None:
    value, loc, weights = _random_inputs(torch.float32, [(4, 4)])
    calls = []

    def wrong(v, shapes, sl, aw):
        calls.append(1)
        return torch.zeros(v.shape[0], sl.shape[1], v.shape[2] * v.shape[3])

    register_backend(Backend(name="unverified", fn=wrong, is_available=lambda v: None, verified=False))
    try:
        out = ms_deform_attn(value, [(4, 4)], loc, weights)
        assert not calls and out.abs().sum() > 0
        ms_deform_attn(value, [(4, 4)], loc, weights, backend="unverified")
        assert calls == [1]
    finally:
        from cuda_ops import dispatch

        dispatch._BACKENDS.pop("unverified")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    shapes = [(8, 12), (4, 6)]
    value, loc, weights = _random_inputs(torch.float32, shapes)
    cpu = ms_deform_attn(value, shapes, loc.float(), weights, backend="pytorch")
    gpu = ms_deform_attn(value.cuda(), shapes, loc.float().cuda(), weights.cuda(), backend="pytorch")
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=1e-5)
