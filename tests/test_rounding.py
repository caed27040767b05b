"""The float32 rounding emulation (tests/rounding.py) that the numerical tests take their tolerances from.

It must bound every correct float32 implementation (any summation order) and not be vacuous: checked on a
sum in three orders (sequential, pairwise, torch's own), against this machine's float32 at 1 and 2 threads
for every module output of a tiny ViT-Adapter + UperNet, and, with the errors switched off, it must
compute the float64 result itself.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import models
from micro_params import tiny_config
from rounding import LAMBDA, U32, U64, emulated_float32, forward_spreads

UPERNET = "upernet_deit_adapter_tiny_512_160k_ade20k"


def _sequential_float32(values: np.ndarray) -> float:
    total = np.float32(0)
    for value in values.astype(np.float32):
        total = np.float32(total + value)
    return float(total)


def _pairwise_float32(values: np.ndarray) -> float:
    values = values.astype(np.float32)
    while values.size > 1:
        if values.size % 2:
            values = np.append(values, np.float32(0))
        values = (values[0::2] + values[1::2]).astype(np.float32)
    return float(values[0])


def test_a_sum_in_any_order_is_within_the_bound() -> None:
    n = 4096
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal(n) + 0.3)  # random signs with a drift: both terms of the model
    exact, spreads = forward_spreads(lambda: {"sum": x.sum().reshape(1)}, runs=16)
    sigma = spreads["sum"]["norm"]
    # the model's spread for one sequential pass (tests/rounding.py): u sqrt((n/2 + 1) sum t^2 + n/3 y^2) / sqrt(3)
    expected = U32 * np.sqrt(((n / 2 + 1) * float((x**2).sum()) + n / 3 * float(exact["sum"]) ** 2) / 3)
    assert 0.5 * expected <= sigma <= 2 * expected
    for order, total in (
        ("sequential", _sequential_float32(x.numpy())),
        ("pairwise", _pairwise_float32(x.numpy())),
        ("torch", float(x.float().sum())),
    ):
        assert abs(total - float(exact["sum"])) <= LAMBDA * sigma, order


def test_no_errors_means_float64_itself() -> None:
    """With a zero unit the emulation (decompositions included) is float64 again, to float64 rounding."""
    torch.manual_seed(0)
    model = models.build_segmentor(tiny_config(UPERNET)).double().eval()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    exact, spreads = forward_spreads(lambda: {"logits": model(x)}, runs=2)
    with torch.no_grad(), emulated_float32(0, unit=0.0):
        again = model(x)
    bound = 2 * LAMBDA * spreads["logits"]["norm"] * U64 / U32  # two float64 implementations
    assert (again - exact["logits"]).norm() <= bound


@pytest.mark.parametrize("threads", [1, 2])
def test_the_spread_bounds_this_machines_float32_without_being_vacuous(threads: int) -> None:
    """Every leaf module's output of a tiny model: this CPU's float32 error within LAMBDA sigma, and sigma
    within 20x of it (the model assumes the sequential order, the kernels add in blocks)."""
    torch.manual_seed(0)
    model64 = models.build_segmentor(tiny_config(UPERNET)).double().eval()
    model32 = copy.deepcopy(model64).float()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)

    def outputs(model: torch.nn.Module, image: torch.Tensor, emulate: int | None = None) -> dict:
        captured: dict[str, torch.Tensor] = {}
        hooks = [
            module.register_forward_hook(
                lambda _m, _i, out, name=name: captured.__setitem__(name, out.detach().double().clone())
            )
            for name, module in model.named_modules()
            if not list(module.children()) and name
        ]
        with torch.no_grad():
            if emulate is None:
                model(image)
            else:
                with emulated_float32(emulate):
                    model(image)
        for hook in hooks:
            hook.remove()
        return captured

    exact = outputs(model64, x)
    emulated = [outputs(model64, x, seed) for seed in range(3)]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        actual = outputs(model32, x.float())
    finally:
        torch.set_num_threads(previous)
    checked = 0
    for name, value in exact.items():
        if value.abs().max() == 0:
            continue  # a zero-initialised layer: exact in every precision
        sigma = float(np.sqrt(np.mean([float((run[name] - value).norm()) ** 2 for run in emulated])))
        error = float((actual[name] - value).norm())
        assert error <= LAMBDA * sigma, (name, error, sigma)
        assert sigma <= 20 * max(error, U32 * float(value.norm())), (name, error, sigma)
        checked += 1
    assert checked > 100
