"""The train-step checks can fail: each planted bug below makes at least one of them fail, by name.

The checks are those of tests/engine/test_train_step_reference.py, run on a model (or recipe) with one bug
planted. Slow (each bug needs its own float64 and float32 steps); run with ``-m slow``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import test_train_step_reference as checks
import torch
from torch import nn

import models
import recorded_step as step
from rounding import BranchPins

pytestmark = pytest.mark.slow


def _detach_output(module: nn.Module) -> None:
    module.register_forward_hook(lambda _m, _i, out: out.detach())


def _bfloat16_output(module: nn.Module) -> None:
    module.register_forward_hook(lambda _m, _i, out: out.to(torch.bfloat16).to(out.dtype))


# name -> (what the bug does to a fresh model, in place)
MODEL_BUGS: dict[str, Callable[[nn.Module], None]] = {
    # the adapter's up-sampling path cut off from back-propagation (a stray .detach())
    "detached_path": lambda model: _detach_output(model.backbone.up),
    # BatchNorm's running statistics updated with momentum 0.01 instead of the reference's 0.1
    "bn_momentum": lambda model: setattr(model.decode_head.fpn_bottleneck.bn, "momentum", 0.01),
    # a bfloat16 round trip inside the float32 path (a stray autocast or cast)
    "bfloat16_cast": lambda model: _bfloat16_output(model.backbone.interactions[0].injector.attn.value_proj),
}


def _planted(bug: str, dtype: torch.dtype) -> nn.Module:
    model = step.fresh_model(dtype)
    MODEL_BUGS[bug](model)
    return model


def _failures(bug: str) -> list[str]:
    """The checks that fail on the planted model (float64 checks on its float64 run, float32 ones on its
    float32 runs, branches pinned to its own float64 run's choices)."""
    exact, pins = step.exact_run(_planted(bug, torch.float64))
    free = step.run_step(
        torch.float32, pins=BranchPins(), branches="record", model=_planted(bug, torch.float32)
    )
    pinned = step.run_step(torch.float32, pins=pins, branches="impose", model=_planted(bug, torch.float32))
    config = models.get_config(step.NAME, step.OVERRIDES)
    cases = {
        "float64_losses": lambda: checks.check_float64_losses(exact),
        "float64_gradient_norms": lambda: checks.check_float64_gradient_norms(exact),
        "float64_is_the_recording": lambda: checks.check_float64_is_the_recording(exact),
        "float32_forward": lambda: checks.check_float32_forward(exact, free),
        "float32_gradients": lambda: checks.check_float32_gradients(exact, pinned),
        "adamw_step": lambda: checks.check_adamw_step(exact, config),
    }
    failed = []
    for name, check in cases.items():
        try:
            check()
        except AssertionError:
            failed.append(name)
    return failed


@pytest.mark.parametrize(
    ("bug", "must_fail"),
    [
        ("detached_path", {"float64_gradient_norms", "float64_is_the_recording"}),
        ("bn_momentum", {"float64_is_the_recording"}),
        # the float32 checks compare with the planted model's own float64 run, which has the cast too: the
        # float64 checks against the recording catch it
        ("bfloat16_cast", {"float64_losses", "float64_gradient_norms", "float64_is_the_recording"}),
    ],
)
def test_a_planted_bug_fails_the_checks(bug: str, must_fail: set[str]) -> None:
    failed = set(_failures(bug))
    assert must_fail <= failed, f"{bug}: only {sorted(failed)} failed"


def test_a_wrong_layer_decay_rate_fails_the_group_and_step_checks() -> None:
    """0.9 instead of the recipe's 0.95: the per-parameter lrs, and so the AdamW step, move."""
    config = models.get_config(step.NAME, {**step.OVERRIDES, "optimizer.layer_decay_rate": 0.9})
    with pytest.raises(AssertionError):
        checks.check_parameter_groups_and_schedule(step.fresh_model(), config)
    exact, _ = step.exact_run()
    with pytest.raises(AssertionError):
        checks.check_adamw_step(exact, config)


def test_the_unplanted_model_passes_every_check() -> None:
    """The same harness without a bug: nothing fails (so the failures above are the bugs')."""
    exact, pins = step.exact_run()
    free = step.run_step(torch.float32, pins=BranchPins(), branches="record")
    pinned = step.run_step(torch.float32, pins=pins, branches="impose")
    checks.check_float64_losses(exact)
    checks.check_float64_gradient_norms(exact)
    checks.check_float64_is_the_recording(exact)
    checks.check_float32_forward(exact, free)
    checks.check_float32_gradients(exact, pinned)
    checks.check_adamw_step(exact, models.get_config(step.NAME, step.OVERRIDES))
