"""Float32 rounding of a computation, emulated in float64: where the float tolerances of the tests come from.

A float32 result differs from exact arithmetic by rounding errors whose size is set by the computation (the
magnitudes it adds, its reduction lengths, its conditioning) and whose actual values are set by the
implementation (summation order, vector width, FMA, the BLAS/oneDNN kernel chosen for the CPU). A tolerance
measured as "a few times what this machine computed" therefore fails on the next CPU (docs/reference.md §T6
tells how it did). The tests here take their tolerances from the computation instead, by the standard model
of rounding-error analysis (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., §2.2, §3.1;
its probabilistic form, Higham & Mary, SIAM J. Sci. Comput. 41 (2019)):

* every elementary operation returns ``fl(y) = y (1 + d)`` with ``|d| <= u = 2^-24`` (float32 round to
  nearest); a result that float32 represents exactly (a count, an integer index, a power of two) has ``d = 0``;
* an element-wise operation therefore errs by at most ``c u |y|``: ``c = 1`` for the correctly rounded ones
  (+, -, x, /, sqrt), ``c = 8`` (four ulp) for transcendental functions (exp, log, erf, tanh), whose
  vectorised implementations are accurate to a few ulp;
* a reduction of ``n`` terms ``t_i`` with sum ``y`` (a sum, a dot product, a convolution window) errs by
  ``sum_k d_k S_k`` over its ``n`` partial sums ``S_k``. Every BLAS and oneDNN kernel adds in an order fixed
  by the shapes, not by the values, so for the values of a network ``E[S_k^2] ~ (k/n) sum t_i^2 + (k/n)^2
  y^2``; with independent ``d_k`` uniform in ``[-u, u]`` (the random-rounding model of Monte Carlo arithmetic
  / the CESTAC method) the error's variance is ``(u^2 / 3) (n/2 sum t_i^2 + n/3 y^2)`` for one sequential
  pass, plus ``(u^2 / 3) sum t_i^2`` for rounding each product. Blocked, vectorised and pairwise orders
  (several partial sums, each shorter) stay below it.

:class:`RandomRounding` runs a computation in float64 (exact arithmetic to ~1e-16, next to float32's 6e-8)
and adds to every operation's result an independent error ``u s r`` with ``r`` uniform in ``[-1, 1]`` and
``s = c |y|``, or ``s = sqrt((n/2 + 1) sum t_i^2 + n/3 y^2)`` for a reduction (the variance above), with
``sum t_i^2`` computed by the same operation on the squares of its inputs. Composite operations (normalisations, softmax, GELU, interpolation, grid sampling, the loss) are
split into their elementary steps by PyTorch's own decompositions, so the coordinate arithmetic of a
resize or a bilinear sample rounds like any other step. A few independent runs give the spread
``sigma(Q)`` of every quantity ``Q`` of interest: float32's rounding error of ``Q`` under the model, a property
of the computation and its inputs, the same on every machine (the runs are float64 and seeded).

The bound. The error of a correct float32 implementation is a sum of many small independent terms whose
spread the model over-estimates (it assumes the worst summation order), so it stays within
:data:`LAMBDA` ``= 5`` times ``sigma(Q)``: for a tensor ``Q``, compared by the norm of its error, the norm
concentrates and 5 is ample; for a scalar estimated from :data:`RUNS` ``= 8`` runs, a Student-t tail with
7 degrees of freedom puts ``|error| > 5 sigma`` at p ~ 1.6e-3 even if the model were exact rather than
pessimistic. Two float32 implementations (ours and a recording's) therefore differ by at most
``2 LAMBDA sigma``; a float64 implementation errs by ``sigma * 2^-29`` (rounding errors scale with ``u``, to
first order), which is how the float64 checks get their bound.

Branch points. ReLU masks and max-pool choices are not continuous: where float32 puts an input within its
rounding error of the branch point (a *tie*), two correct implementations take different branches, and the
gradients below differ by far more than rounding (train-mode BatchNorm spreads one flipped mask over its
channel, then over everything below). The deformable attention's bilinear sampling has the same kind of
branch: its value is continuous in the sampling location, but its gradient with respect to the location is
the slope of the pixel cell the location falls in, which jumps at a pixel edge. A location within rounding
of an edge (one emulated draw of the training step put one 2e-6 pixel from an edge on the other side, and
the gradients of everything below that query moved by up to 89 times their rounding spread) takes either
cell. :class:`BranchPins` records exact arithmetic's choices in a float64 run and makes another run take
them; the tests pin such choices, and check that every choice they pinned was a tie (within the rounding
band of its input).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch._decomp import decomposition_table
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from models.adapter.ms_deform_attn import MSDeformAttn

aten = torch.ops.aten
prims = torch.ops.prims

U32 = 2.0**-24  # float32 unit roundoff
U64 = 2.0**-53  # float64 unit roundoff
LAMBDA = 5.0  # the bound, in multiples of the emulated spread (see the module docstring)
RUNS = 8  # independent emulated runs behind each spread
TRANSCENDENTAL = 8  # error of exp, log, erf, tanh, ... in units of u (four ulp)
# how far inside its pinned cell a sampling location is put, in units of float32's unit roundoff times the
# map's size: the sampler recomputes the pixel coordinate from the location (``2 loc - 1``, then
# ``((g + 1) W - 1) / 2`` or an equivalent order), a few roundings of size ``u W`` each, which must not carry
# it back across the edge
CELL_MARGIN = 16

# no rounding: data movement, selections, comparisons, exact sign/abs/min/max, casts up to float64
# fmt: off
# no rounding: data movement, selections, comparisons, exact sign/abs/min/max, casts up to float64
_EXACT = {
    aten.view, aten._unsafe_view, aten.reshape, aten.alias, aten.t, aten.transpose, aten.permute, aten.expand,
    aten.unsqueeze, aten.squeeze, aten.select, aten.slice, aten.as_strided, aten.as_strided_, aten.detach,
    aten.clone, aten.contiguous, aten.cat, aten.stack, aten.split, aten.split_with_sizes, aten.unbind,
    aten.select_backward, aten.slice_backward, aten.index, aten._unsafe_index, aten.index_select, aten.gather,
    aten.scatter, aten.where, aten.masked_fill, aten.masked_fill_, aten.constant_pad_nd, aten.copy_,
    aten._to_copy, aten.to, aten.lift_fresh, aten.empty, aten.empty_like, aten.empty_strided, aten.new_empty,
    aten.new_empty_strided, aten.new_zeros, aten.new_ones, aten.new_full, aten.zeros, aten.zeros_like,
    aten.ones, aten.ones_like, aten.full, aten.full_like, aten.fill_, aten.zero_, aten.arange,
    aten.scalar_tensor, aten.relu, aten.relu_, aten.threshold_backward, aten.neg, aten.abs, aten.sign,
    aten.clamp, aten.clamp_, aten.clamp_min, aten.clamp_max, aten.maximum, aten.minimum, aten.amax, aten.amin,
    aten.max, aten.min, aten.argmax, aten.topk, aten.sort, aten.floor, aten.ceil, aten.trunc, aten.round,
    aten.eq, aten.ne, aten.lt, aten.le, aten.gt, aten.ge, aten.logical_and, aten.logical_or, aten.logical_not,
    aten.bitwise_and, aten.isnan, aten.any, aten.all, aten.nonzero, aten.max_pool2d_with_indices,
    aten.diagonal, aten._local_scalar_dense, aten.repeat_interleave, aten.repeat, aten.flatten, aten.unflatten,
    aten.narrow, aten.chunk, aten.expand_as, aten.view_as, aten.squeeze_, aten.unsqueeze_, aten.detach_,
    aten.split_with_sizes_copy, aten.unbind_copy, aten.bernoulli_, aten.uniform_, aten.rand, aten.randn,
    aten.normal_, aten.lift_fresh_copy, aten.flip, aten.roll, aten.pad, aten.movedim, aten.bitwise_not,
    aten.bitwise_or, aten.logical_xor, aten.masked_select, aten.argsort, aten.argmin, aten.isinf,
    aten.isfinite, aten._unique2, aten.bincount, aten.one_hot, aten.tril, aten.triu,
    aten.conj_physical, aten.conj, aten.resolve_conj, aten.resolve_neg, aten.clone, prims.broadcast_in_dim,
}
# one rounding of the result, in units of u
_ELEMENTWISE = {
    aten.add: 1, aten.add_: 1, aten.sub: 1, aten.sub_: 1, aten.rsub: 1, aten.mul: 1, aten.mul_: 1,
    aten.div: 1, aten.div_: 1, aten.reciprocal: 1, aten.sqrt: 1, aten.square: 1, prims.div: 1,
    aten.rsqrt: 2, aten.pow: 2, aten.addcmul: 2, aten.addcmul_: 2, aten.addcdiv: 2, aten.lerp: 2,
    aten.exp: TRANSCENDENTAL, aten.exp_: TRANSCENDENTAL, aten.log: TRANSCENDENTAL,
    aten.log1p: TRANSCENDENTAL, aten.expm1: TRANSCENDENTAL, aten.erf: TRANSCENDENTAL,
    aten.tanh: TRANSCENDENTAL, aten.sigmoid: TRANSCENDENTAL, aten.sin: TRANSCENDENTAL,
    aten.cos: TRANSCENDENTAL, aten.log_sigmoid: TRANSCENDENTAL, aten.xlogy: TRANSCENDENTAL,
}
# split into elementary steps (PyTorch's decompositions), each step rounding on its own
_DECOMPOSE = {
    aten.native_layer_norm, aten.native_layer_norm_backward, aten.native_batch_norm,
    aten.native_batch_norm_backward, aten._native_batch_norm_legit, aten._native_batch_norm_legit_functional,
    aten.native_group_norm, aten.native_group_norm_backward, aten.gelu, aten.gelu_backward,
    aten.grid_sampler_2d, aten.upsample_bilinear2d, aten.upsample_bicubic2d, aten._softmax,
    aten._softmax_backward_data, aten._log_softmax, aten._log_softmax_backward_data, aten.nll_loss2d_forward,
    aten.nll_loss2d_backward, aten.nll_loss_forward, aten.nll_loss_backward, aten._adaptive_avg_pool2d,
    aten.max_pool2d_with_indices_backward, aten.var_mean, aten.var, aten.std, aten.linalg_vector_norm,
    aten.baddbmm, aten.matmul, aten.linear, aten.silu, aten.silu_backward, aten.sigmoid_backward,
    aten.binary_cross_entropy_with_logits, aten.mse_loss, aten.mse_loss_backward, aten.einsum,
    aten.log_sigmoid_forward, aten.log_sigmoid_backward, aten.softplus, aten.softplus_backward,
    aten.binary_cross_entropy, aten.binary_cross_entropy_backward, aten.logsumexp, aten.norm, aten.elu,
    aten.leaky_relu, aten.hardtanh, aten.embedding, aten.embedding_dense_backward, aten.native_dropout,
    aten.native_dropout_backward, aten.smooth_l1_loss, aten.huber_loss,
}
# fmt: on


def _is_float(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()


def _squared(x: Any) -> Any:
    return x.square() if _is_float(x) else x


def _on_squares(func: Any, args: tuple, kwargs: dict) -> Any:
    """The operation on the squares of its inputs: ``sum_i t_i^2`` for a sum of products ``t_i`` (for a
    weighted sum such as an interpolation, ``sum_i w_i v_i^2 >= sum_i (w_i v_i)^2``, weights in [0, 1])."""
    return func(*[_squared(a) for a in args], **{k: _squared(v) for k, v in kwargs.items()})


def _sum_size(n: int, squares: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """``s`` of a sum of ``n`` terms: the random-order sequential error (module docstring), plus one rounding
    of each product term."""
    return ((n / 2 + 1) * squares + (n / 3) * total.square()).sqrt()


class RandomRounding(TorchDispatchMode):
    """Within this mode every floating-point result carries a random error of float32's size.

    Args:
        seed: seeds the errors (runs with different seeds are independent draws).
        unit: the unit roundoff emulated (:data:`U32`).
    """

    def __init__(self, seed: int, unit: float = U32) -> None:
        super().__init__()
        self.generator = torch.Generator().manual_seed(seed)
        self.unit = unit

    def perturb(self, out: torch.Tensor, size: torch.Tensor | float) -> None:
        """Add ``unit * size * r`` (r uniform in [-1, 1]) to ``out`` in place, except where float32 is exact."""
        if out.dtype != torch.float64:  # computed in float32 (e.g. the reference points): real rounding
            return
        with _disable_current_modes():  # the emulation's own arithmetic does not round
            r = torch.rand(out.shape, generator=self.generator, dtype=out.dtype).mul_(2).sub_(1)
            noise = r * size * self.unit
            # exact results (and infinities: -inf from log(0), then masked) carry no error
            inexact = (out != out.to(torch.float32).to(out.dtype)) & torch.isfinite(noise)
            out.add_(torch.where(inexact, noise, torch.zeros_like(noise)))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in _DECOMPOSE and func in decomposition_table:
            with self:
                return decomposition_table[func](*args, **kwargs)
        out = func(*args, **kwargs)
        if packet in _EXACT:
            return out
        if packet in _ELEMENTWISE:
            if _is_float(out):
                self.perturb(out, _ELEMENTWISE[packet] * out.abs())
            return out
        rule = _REDUCTIONS.get(packet)
        if rule is None:
            raise NotImplementedError(f"{func}: no rounding rule (classify it in tests/rounding.py)")
        rule(self, func, args, kwargs, out)
        return out


def _count(args: tuple, out: torch.Tensor) -> int:
    """Terms per result of a reduction of ``args[0]`` into ``out``."""
    return max(1, args[0].numel() // max(out.numel(), 1))


def _sum(mode: RandomRounding, func, args, kwargs, out) -> None:
    mode.perturb(out, _sum_size(_count(args, out), _on_squares(func, args, kwargs), out))


def _mean(mode: RandomRounding, func, args, kwargs, out) -> None:  # the sum, then one division
    n = _count(args, out)
    mode.perturb(out, _sum_size(n, _on_squares(func, args, kwargs) * n, out * n) / n + out.abs())


def _variance(mode: RandomRounding, func, args, kwargs, out) -> None:
    # a sum of n non-negative squares (partial sums grow steadily: s = sqrt(n / 3) |sum|), the centring and
    # the division
    mode.perturb(out, (math.sqrt(_count(args, out) / 3) + 2) * out.abs())


def _matmul(mode: RandomRounding, func, args, kwargs, out) -> None:
    # mm(a, b), bmm(a, b): a's last dimension; addmm(c, a, b): that plus the added c
    n = args[0].shape[-1] if func.overloadpacket in (aten.mm, aten.bmm) else args[1].shape[-1] + 1
    mode.perturb(out, _sum_size(n, _on_squares(func, args, kwargs), out))


def _convolution(mode: RandomRounding, func, args, kwargs, out) -> None:
    weight, bias, transposed = args[1], args[2], args[6]
    if transposed:  # each output sums C_in / groups taps of at most ceil(k / stride) per dimension
        stride = args[3]
        taps = math.prod(math.ceil(k / s) for k, s in zip(weight.shape[2:], stride, strict=True))
        n = weight.shape[0] // args[8] * taps
    else:
        n = weight[0].numel()
    mode.perturb(out, _sum_size(n + (bias is not None), _on_squares(func, args, kwargs), out))


def _convolution_backward(mode: RandomRounding, func, args, kwargs, out) -> None:
    grad_out, weight, groups = args[0], args[2], args[9]
    per_image = grad_out.shape[0] * grad_out[0, 0].numel()
    lengths = (weight.shape[0] // groups * weight[0, 0].numel(), per_image, per_image)
    for result, squares, n in zip(out, _on_squares(func, args, kwargs), lengths, strict=True):
        if result is not None:
            mode.perturb(result, _sum_size(n, squares, result))


def _scatter_sum(mode: RandomRounding, func, args, kwargs, out) -> None:
    sources = sum(a.numel() for a in args[1:] if _is_float(a))
    n = max(1, math.ceil(sources / max(out.numel(), 1))) + 1
    mode.perturb(out, _sum_size(n, _on_squares(func, args, kwargs), out))


def _coordinate(size: int, squares: torch.Tensor) -> torch.Tensor:
    """Error from the coordinate arithmetic of a resize or a bilinear sample: each sampling weight comes from a
    coordinate up to ``size`` through a scale, a shift and a floor (three roundings), so it errs by up to
    ``3 size u``, independently per contribution; ``squares`` sums the squared contributions."""
    return 3.0 * size * squares.sqrt()


def _grid_sampler_backward(mode: RandomRounding, func, args, kwargs, out) -> None:
    grad_out, values = args[0], args[1]
    grad_input, grad_grid = out
    height, width = values.shape[-2:]
    size = max(height, width)
    if grad_input is not None:  # a scatter of weight x grad onto the 4 taps of each sample
        n = max(4, math.ceil(4 * grad_out[0, 0].numel() / (height * width)))
        squares = _on_squares(func, args, kwargs)[0]
        mode.perturb(grad_input, _sum_size(n, squares, grad_input) + _coordinate(size, squares))
    if grad_grid is not None:  # sum over channels and taps of grad x tap value x size / 2
        peak = values.square().amax(dim=(-2, -1))  # (N, C): the largest squared value of each channel
        squares = torch.einsum("nchw,nc->nhw", grad_out.square(), peak) * 4  # (N, Hq, Wq)
        squares = torch.stack((squares * width**2 / 4, squares * height**2 / 4), dim=-1)
        n = 4 * values.shape[1]
        mode.perturb(grad_grid, _sum_size(n, squares, grad_grid) + _coordinate(size, squares))


def _upsample_backward(mode: RandomRounding, func, args, kwargs, out) -> None:
    grad_out, input_size = args[0], args[2]
    taps = 16 if func.overloadpacket is aten.upsample_bicubic2d_backward else 4
    ratio = grad_out[0, 0].numel() / max(1, math.prod(input_size[-2:]))
    n = max(taps, math.ceil(taps * ratio))
    squares = _on_squares(func, args, kwargs)
    mode.perturb(out, _sum_size(n, squares, out) + _coordinate(max(input_size[-2:]), squares))


def _upsample_antialiased(mode: RandomRounding, func, args, kwargs, out) -> None:
    # a separable weighted sum whose support widens with the down-sampling factor (antialiasing): per
    # dimension 4 (bicubic) or 2 (bilinear) taps times the factor; |weights| <= ~1.1 (bicubic's lobes), so
    # the operation on |squares| bounds sum_i (w_i v_i)^2
    taps = 4 if func.overloadpacket is aten._upsample_bicubic2d_aa else 2
    size_in, size_out = args[0].shape[-2:], out.shape[-2:]
    n = math.prod(math.ceil(taps * max(1.0, i / o)) for i, o in zip(size_in, size_out, strict=True))
    squares = _on_squares(func, args, kwargs).abs()
    mode.perturb(out, _sum_size(n, squares, out) + _coordinate(max(size_in), squares))


def _adaptive_pool_backward(mode: RandomRounding, func, args, kwargs, out) -> None:
    # each input element receives the grads of the (at most 4, for any output size) windows covering it,
    # each divided by its window's size
    mode.perturb(out, _sum_size(4, _on_squares(func, args, kwargs), out) + out.abs())


def _avg_pool(mode: RandomRounding, func, args, kwargs, out) -> None:
    # a window sum of k terms, then one division by k
    kernel = args[1] if isinstance(args[1], list | tuple) else [args[1]] * 2
    k = math.prod(kernel)
    squares = _on_squares(func, args, kwargs) * k  # avg_pool(x^2) * k = sum of x^2 over the window
    mode.perturb(out, _sum_size(k, squares, out * k) / k + out.abs())


def _avg_pool_backward(mode: RandomRounding, func, args, kwargs, out) -> None:
    # each input element receives grad / k from every window covering it: ceil(k / stride) per dimension
    kernel, stride = args[2], args[3] or args[2]
    n = math.prod(math.ceil(k / s) for k, s in zip(kernel, stride, strict=True))
    mode.perturb(out, _sum_size(n, _on_squares(func, args, kwargs), out) + out.abs())


def _safe_softmax(mode: RandomRounding, func, args, kwargs, out) -> None:
    # exp (TRANSCENDENTAL), a sum of n positive terms (sqrt(n / 3) of the sum), one division
    n = args[0].shape[args[1]]
    mode.perturb(out, (math.sqrt(n / 3) + TRANSCENDENTAL + 1) * out.abs())


# fmt: off
_REDUCTIONS: dict[Any, Callable[..., None]] = {
    aten.sum: _sum, prims.sum: _sum, aten.mean: _mean, prims.var: _variance,
    aten.mm: _matmul, aten.bmm: _matmul, aten.addmm: _matmul,
    aten.convolution: _convolution, aten.convolution_backward: _convolution_backward,
    aten.index_put: _scatter_sum, aten.index_put_: _scatter_sum, aten._unsafe_index_put: _scatter_sum,
    aten.scatter_add: _scatter_sum, aten.index_add: _scatter_sum,
    aten.grid_sampler_2d_backward: _grid_sampler_backward,
    aten.upsample_bilinear2d_backward: _upsample_backward,
    aten.upsample_bicubic2d_backward: _upsample_backward,
    aten._upsample_bicubic2d_aa: _upsample_antialiased, aten._upsample_bilinear2d_aa: _upsample_antialiased,
    aten._adaptive_avg_pool2d_backward: _adaptive_pool_backward,
    aten.avg_pool2d: _avg_pool, aten.avg_pool2d_backward: _avg_pool_backward,
    aten._safe_softmax: _safe_softmax,
}
# fmt: on


@contextlib.contextmanager
def emulated_float32(seed: int, unit: float = U32) -> Iterator[RandomRounding]:
    """Run the enclosed float64 computation with float32's rounding errors drawn from ``seed`` (``unit=0``:
    the same decomposed computation without errors).

    Attention goes through PyTorch's math implementation (matmuls and a softmax, which the emulation rounds
    step by step) rather than a fused kernel that has no decomposition.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    mode = RandomRounding(seed, unit)
    with sdpa_kernel([SDPBackend.MATH]), mode:
        yield mode


class BranchPins:
    """Exact arithmetic's branch choices, recorded in one run and imposed on others: ReLU masks, max-pool
    picks, and the pixel cells of the deformable attention's bilinear samples.

    Modules are matched by name, so the run that records and the runs that follow may be copies of one model
    in other dtypes. Each module is expected to run once per forward (true of the models tested here).

    A cell is imposed by moving the sampling location into the recorded cell, :data:`CELL_MARGIN` ``u W``
    inside its edge, where the location lies on the other side or closer to the edge than that (the move
    is detached: the location's gradient passes unchanged). Elsewhere the location is left as it is. The
    size of the largest move of each module's latest imposed run is in :attr:`moved`: a tie's distance
    from its edge plus the margin, which the tests check is within rounding.
    """

    def __init__(self) -> None:
        self.masks: dict[str, torch.Tensor] = {}  # ReLU name -> input > 0, from the recording run
        self.choices: dict[str, torch.Tensor] = {}  # max-pool name -> argmax indices
        # deformable attention name -> the floor of its pixel coordinates, from the recording run
        self.cells: dict[str, torch.Tensor] = {}
        self.inputs: dict[str, torch.Tensor] = {}  # branch name -> its input in the latest run
        self.recorded: dict[str, torch.Tensor] = {}  # branch name -> its input in the recording run
        self.moved: dict[str, float] = {}  # deformable attention name -> largest move (pixels), latest run
        # deformable attention name -> the largest margin it kept from an edge (pixels), latest run
        self.margins: dict[str, float] = {}
        self.pools: dict[str, nn.MaxPool2d] = {}  # max-pool name -> the module (its window)

    @staticmethod
    def _branches(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        for name, module in model.named_modules():
            if isinstance(module, nn.ReLU | nn.MaxPool2d | MSDeformAttn):
                yield name, module

    @contextlib.contextmanager
    def record(self, model: nn.Module) -> Iterator[BranchPins]:
        """Record the choices ``model`` makes (its inputs in :attr:`inputs`), leaving them free."""
        with self._patched(model, impose=False):
            yield self

    @contextlib.contextmanager
    def impose(self, model: nn.Module) -> Iterator[BranchPins]:
        """Make ``model`` take the recorded choices; its own inputs go to :attr:`inputs`."""
        with self._patched(model, impose=True):
            yield self

    @contextlib.contextmanager
    def _patched(self, model: nn.Module, impose: bool) -> Iterator[None]:
        patched = []
        for name, module in self._branches(model):
            method = "sample" if isinstance(module, MSDeformAttn) else "forward"
            setattr(module, method, self._forward(name, module, impose))
            patched.append((module, method))
        try:
            yield
        finally:
            for module, method in patched:
                delattr(module, method)  # back to the class's method

    def _input(self, name: str, x: torch.Tensor, impose: bool) -> None:
        self.inputs[name] = x.detach().clone()
        if not impose:
            self.recorded[name] = self.inputs[name]

    def _forward(self, name: str, module: nn.Module, impose: bool) -> Callable[..., torch.Tensor]:
        if isinstance(module, nn.ReLU):

            def relu(x: torch.Tensor) -> torch.Tensor:
                self._input(name, x, impose)
                if not impose:
                    self.masks[name] = x.detach() > 0
                return x * self.masks[name].to(x.dtype)

            return relu

        if isinstance(module, MSDeformAttn):
            return self._sampler(name, module, impose)

        self.pools[name] = module

        def max_pool(x: torch.Tensor) -> torch.Tensor:
            self._input(name, x, impose)
            pooled, indices = nn.functional.max_pool2d(
                x,
                module.kernel_size,
                module.stride,
                module.padding,
                module.dilation,
                module.ceil_mode,
                return_indices=True,
            )
            if not impose:
                self.choices[name] = indices
                return pooled
            chosen = self.choices[name]
            # (B, C, H, W) -> (B, C, H*W), gathered at the recorded flat indices, back to (B, C, h, w)
            return x.flatten(2).gather(2, chosen.flatten(2)).view_as(chosen)

        return max_pool

    def _sampler(self, name: str, module: MSDeformAttn, impose: bool) -> Callable[..., torch.Tensor]:
        sample = type(module).sample.__get__(module)

        def pinned(value, spatial_shapes, locations, weights):
            with _disable_current_modes():  # the pin's own arithmetic is exact (float64), not emulated
                # (L, 2) as (W, H), broadcast over (B, Q, M, L, P, 2)
                size = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=torch.float64)
                size = size.to(locations.device)[None, None, None, :, None, :]
                # grid_sample's pixel coordinate (align_corners=False)
                pixel = locations.detach().double() * size - 0.5
                self._input(name, pixel, impose)
                if not impose:
                    self.cells[name] = pixel.floor()
                    return sample(value, spatial_shapes, locations, weights)
                cell = self.cells[name]
                margin = CELL_MARGIN * U32 * size
                target = torch.minimum(torch.maximum(pixel, cell + margin), cell + 1 - margin)
                self.moved[name] = float((target - pixel).abs().max())
                self.margins[name] = float(margin.max())
                move = ((target - pixel) / size).to(locations.dtype)  # exactly 0 where nothing moves
            return sample(value, spatial_shapes, locations + move, weights)

        return pinned


def spread(deviations: list[torch.Tensor]) -> dict[str, float]:
    """Statistics of one quantity's emulated errors (one tensor per run, emulated minus exact).

    Returns:
        ``norm``: the root mean square over runs of the error's Euclidean norm; ``element``: the largest
        per-element root mean square over runs (the spread of the least certain element); ``peak``: the
        largest error seen in any element and run; ``elements``: the quantity's size.
    """
    stacked = torch.stack([d.detach().double().reshape(-1) for d in deviations])  # (runs, elements)
    return {
        "norm": float(stacked.square().sum(1).mean().sqrt()),
        "element": float(stacked.square().mean(0).sqrt().max()),
        "peak": float(stacked.abs().max()),
        "elements": int(stacked.shape[1]),
    }


def forward_spreads(
    compute: Callable[[], dict[str, torch.Tensor]], runs: int = 4
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, float]]]:
    """Exact outputs of a float64 computation and float32's emulated spread of each.

    Args:
        compute: runs the computation in float64 from scratch and returns its named outputs.
        runs: emulated runs (outputs compared by norms concentrate: a few suffice).

    Returns:
        The exact outputs and, per output, :func:`spread` of its emulated errors.
    """
    with torch.no_grad():
        exact = {k: v.detach().double() for k, v in compute().items()}
        deviations: dict[str, list[torch.Tensor]] = {k: [] for k in exact}
        for seed in range(runs):
            with emulated_float32(seed):
                outputs = compute()
            for key, value in outputs.items():
                deviations[key].append(value.detach().double() - exact[key])
    return exact, {key: spread(values) for key, values in deviations.items()}
