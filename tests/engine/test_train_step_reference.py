"""One training step of UperNet + ViT-Adapter-T against the reference's recording (docs/reference.md §T, §T6).

The recording: the fill-rule weights, a fixed 2-image 96x128 batch, drop path and dropout off, train-mode
BatchNorm (momentum 0.1), float32 on CPU, plus a float64 rerun. Every tolerance below follows from float32
rounding of this computation, not from what a machine computed: ``sigma(Q)`` is the spread float32's
rounding gives a quantity ``Q`` (losses, BatchNorm statistics, gradients, logits, branch inputs) under the
standard rounding model, emulated in float64 (tests/rounding.py, which gives the model and the choice of
``LAMBDA = 5``; the spreads are stored by ``tools/rounding_bounds.py`` and checked by a slow test). Three
kinds of check:

* **float64, sharp** (machine-independent: float64 errs by ``sigma * 2^-29``, two float64 implementations
  differ by at most ``2 LAMBDA sigma 2^-29``): our float64 losses and full gradient norms equal the
  reference's float64 rerun to that; our float64 BatchNorm statistics and gradients differ from the
  recorded float32 values by exactly the recording's own float32-vs-float64 difference (for the BatchNorm
  statistics, stored whole, to both sides; for the gradient subsamples, at most it): the model is the
  reference's computation. The AdamW step from the float64 gradients equals the recorded one to the
  rounding of the recorded gradients and weights.
* **float32, within float32 rounding** (any correct IEEE float32 implementation: any thread count,
  summation order, vector width, BLAS/oneDNN kernel): the forward quantities within ``LAMBDA sigma`` of
  exact arithmetic (the float64 run); the gradients too once the branch choices (ReLU masks, max-pool
  picks) are pinned to exact arithmetic's, and every choice float32 made differently is a tie (its input
  within ``LAMBDA sigma`` of the branch point). Gradients with free ties differ by much more (a flipped
  ReLU mask in train-mode BatchNorm moves its whole channel and everything below it; three such ties on
  one x86 CPU moved them by 2e-3 relative; a deformable-attention sample on the other side of a pixel edge
  moved the gradients below its query by up to 89 times their spread), which is why they are pinned rather
  than bounded.
* **exactly**: every parameter's group, lr and weight decay, and every group's lr at the recorded
  iterations; ``acc_seg`` up to pixels whose top-2 logits are within rounding of each other.

Planted bugs these checks catch (tests/engine/test_train_step_planted_bugs.py, ``slow``): a detached
path, a wrong BatchNorm momentum, a wrong layer-decay rate, a bfloat16 cast in the float32 path.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import models
import models.config
import recorded_step as step
from pipelines.engine.optim import build_optimizer
from pipelines.engine.schedule import apply_lr, scheduled_lr
from reference_data import FIXTURES
from rounding import LAMBDA, U32, U64, BranchPins

RECORDED = step.golden()
BOUNDS = json.loads((FIXTURES / f"train_step_{step.FIXTURE}.rounding.json").read_text())
SPREAD = BOUNDS["quantities"]
FLOAT64 = U64 / U32  # float64's rounding error relative to float32's (2^-29)
ZERO_GRADIENT = "backbone.norm2.bias"  # its true gradient is exactly 0: a bias-free conv, then train-mode BN
# the gradients above every branch point: the recording's float32 run shares no tie with them
TOP = ("decode_head.conv_seg.", "auxiliary_head.conv_seg.")


def sigma(key: str, kind: str = "norm") -> float:
    return SPREAD[key][kind]


@pytest.fixture(scope="module")
def exact() -> tuple[step.StepRun, BranchPins]:
    return step.exact_run()


@pytest.fixture(scope="module")
def free32(exact) -> tuple[step.StepRun, BranchPins]:
    pins = BranchPins()
    return step.run_step(torch.float32, pins=pins, branches="record"), pins


@pytest.fixture(scope="module")
def pinned32(exact) -> step.StepRun:
    _, pins = exact
    return step.run_step(torch.float32, pins=pins, branches="impose")


def _q(run: step.StepRun) -> dict[str, torch.Tensor]:
    return step.quantities(run, RECORDED)


def test_the_fill_is_the_recordings() -> None:
    params = dict(step.fresh_model().named_parameters())
    for name, spec in RECORDED.info["chosen"].items():
        assert params[name].double().sum().item() == pytest.approx(
            spec["param_sum_before"], rel=1e-9, abs=1e-9
        )


def test_parameter_groups_and_schedule() -> None:
    check_parameter_groups_and_schedule(step.fresh_model(), models.get_config(step.NAME, step.OVERRIDES))


def check_parameter_groups_and_schedule(
    model: torch.nn.Module, config: models.config.SegmentorConfig
) -> None:
    optimizer = build_optimizer(model, config.optimizer)
    ours = {g["group_name"]: g for g in optimizer.param_groups}
    names = {id(p): n for n, p in model.named_parameters()}
    assert set(ours) == {g["group_name"] for g in RECORDED.info["groups"]}
    for ref in RECORDED.info["groups"]:
        group = ours[ref["group_name"]]
        assert group["lr"] == ref["lr"] and group["weight_decay"] == ref["weight_decay"], ref["group_name"]
        assert sorted(names[id(p)] for p in group["params"]) == sorted(ref["param_names"])
    assert optimizer.defaults["eps"] == RECORDED.info["optimizer"]["eps"]
    assert list(optimizer.defaults["betas"]) == RECORDED.info["optimizer"]["betas"]
    for iteration, lrs in RECORDED.info["lr_at_iter"].items():
        for group_name, lr in lrs.items():
            got = scheduled_lr(ours[group_name]["initial_lr"], int(iteration), config.schedule)
            assert got == pytest.approx(lr, rel=1e-13, abs=0.0), (iteration, group_name, got, lr)


def test_float64_losses_equal_the_reference_float64_rerun(exact) -> None:
    check_float64_losses(exact[0])


def check_float64_losses(run: step.StepRun) -> None:
    assert run.losses["loss"].dtype == torch.float64
    recorded = RECORDED.info["float64_losses"]
    for key, ref in (
        ("decode.loss_seg", recorded["decode.loss_ce"]),
        ("aux.loss_seg", recorded["aux.loss_ce"]),
        ("loss", RECORDED.info["float64_total_loss"]),
    ):
        bound = 2 * LAMBDA * sigma(f"loss/{key}") * FLOAT64
        assert abs(run.losses[key].item() - ref) <= bound, (key, run.losses[key].item(), ref, bound)


def test_float64_gradient_norms_equal_the_reference_float64_rerun(exact) -> None:
    check_float64_gradient_norms(exact[0])


def check_float64_gradient_norms(run: step.StepRun) -> None:
    for name, spec in RECORDED.info["chosen"].items():
        if name == ZERO_GRADIENT:
            continue
        ours = step.gradient(run, name).norm().item()
        bound = 2 * LAMBDA * BOUNDS["gradient_norms"][name]["norm"] * FLOAT64
        assert abs(ours - spec["grad_norm_float64"]) <= bound, (name, ours, spec["grad_norm_float64"], bound)


def test_float64_is_the_recording_up_to_its_own_rounding(exact) -> None:
    check_float64_is_the_recording(exact[0])


def check_float64_is_the_recording(run: step.StepRun) -> None:
    """|ours64 - ref32| <= |ours64 - ref64| + |ref64 - ref32|: the second term is the recording's floor."""
    ours = _q(run)
    for module in step.BN_MODULES:  # stored whole: the largest difference IS the floor, to float64 rounding
        for stat in ("running_mean", "running_var"):
            key = f"{module}.{stat}"
            diff = (ours[f"bn/{key}"] - torch.from_numpy(RECORDED.arrays[f"bn/{key}.after"]).double()).abs()
            floor = RECORDED.info["bn_float32_floor"][f"{key}.after"]
            assert abs(diff.max().item() - floor) <= 2 * LAMBDA * sigma(f"bn/{key}", "element") * FLOAT64, key
    for name, spec in RECORDED.info["chosen"].items():
        diff = (ours[f"grad/{name}"] - torch.from_numpy(RECORDED.arrays[f"grad/{name}"]).double()).abs()
        bound = spec["grad_float32_floor"] + 2 * LAMBDA * sigma(f"grad/{name}", "element") * FLOAT64
        assert diff.max().item() <= bound, (name, diff.max().item(), bound)
    zero = step.gradient(run, ZERO_GRADIENT).abs().max().item()
    assert zero <= 2 * LAMBDA * sigma(f"grad/{ZERO_GRADIENT}", "peak") * FLOAT64, zero


def test_float32_forward_within_float32_rounding(exact, free32) -> None:
    check_float32_forward(exact[0], free32[0])


def check_float32_forward(exact: step.StepRun, ours32: step.StepRun) -> None:
    ours, reference = _q(ours32), _q(exact)
    for key in reference:
        if key.startswith(("loss/", "bn/", "logits/")):
            error = (ours[key] - reference[key]).norm().item()
            assert error <= LAMBDA * sigma(key), (key, error, LAMBDA * sigma(key))


def test_float32_gradients_within_float32_rounding_with_the_ties_pinned(exact, pinned32) -> None:
    check_float32_gradients(exact[0], pinned32)
    check_cell_pins_moved_only_ties(exact[1])


def check_float32_gradients(exact: step.StepRun, pinned32: step.StepRun) -> None:
    ours, reference = _q(pinned32), _q(exact)
    for name in RECORDED.info["chosen"]:
        key = f"grad/{name}"
        error = (ours[key] - reference[key]).norm().item()
        assert error <= LAMBDA * sigma(key), (name, error, LAMBDA * sigma(key))


def check_cell_pins_moved_only_ties(pins: BranchPins) -> None:
    """The pinned run's bilinear cells moved its sampling locations by at most a tie's width: the location's
    rounding band (LAMBDA times its spread) plus the margin the pin keeps from the cell's edge."""
    assert set(pins.moved) == set(pins.cells)
    for name, moved in pins.moved.items():
        band = LAMBDA * BOUNDS["branches"][name]["element"]
        assert moved <= band + pins.margins[name], (name, moved, band, pins.margins[name])


def test_float32_takes_another_branch_only_at_ties(exact, free32) -> None:
    """Each ReLU input float32 puts on the other side of 0, each max-pool pick it makes differently, and
    each bilinear sample it puts in another pixel cell, lies within float32's rounding band of the branch
    point (the band: LAMBDA times the input's spread)."""
    _, pins = exact
    _, ours = free32
    assert set(ours.inputs) == set(pins.recorded) == set(BOUNDS["branches"])
    # the ReLUs after each BatchNorm, the stem's max-pool, and the adapter's 10 deformable attentions
    assert len(pins.masks) == 19 and len(pins.choices) == 1 and len(pins.cells) == 10
    for name, exact_input in pins.recorded.items():
        band = LAMBDA * BOUNDS["branches"][name]["element"]
        if name in pins.masks:
            differ = ours.masks[name] != pins.masks[name]
            assert (exact_input[differ].abs() <= band).all(), (name, exact_input[differ].abs().max(), band)
            assert ((ours.inputs[name].double() - exact_input)[differ].abs() <= band).all(), name
        elif name in pins.cells:  # another cell: a neighbour, across an edge within the band of both inputs
            differ = ours.cells[name] != pins.cells[name]
            assert ((ours.cells[name] - pins.cells[name])[differ].abs() == 1).all(), name
            edge = torch.maximum(ours.cells[name], pins.cells[name])[differ]
            assert ((exact_input[differ] - edge).abs() <= band).all(), name
            assert ((ours.inputs[name][differ] - edge).abs() <= band).all(), name
        else:  # a pick float32 makes differently: exact arithmetic's two candidates within twice the band
            differ = ours.choices[name] != pins.choices[name]
            flat = exact_input.flatten(2)  # (B, C, H*W)
            gap = flat.gather(2, pins.choices[name].flatten(2)) - flat.gather(
                2, ours.choices[name].flatten(2)
            )
            assert (gap.view_as(differ)[differ] <= 2 * band).all(), name


def _correct_pixels(run: step.StepRun, head: str) -> int:
    prefix = {"decode_head": "decode", "auxiliary_head": "aux"}[head]
    return round(run.losses[f"{prefix}.acc_seg"].item() / 100 * step.batch(torch.float64)[1].numel())


def test_accuracy_up_to_pixels_whose_top_two_logits_tie(exact, free32) -> None:
    run, _ = exact
    labels = step.batch(torch.float64)[1]
    recorded = {"decode_head": "decode.acc_seg", "auxiliary_head": "aux.acc_seg"}
    for head, key in recorded.items():
        logits = F.interpolate(run.logits[head], size=labels.shape[1:], mode="bilinear", align_corners=False)
        top = logits.topk(2, dim=1).values  # (B, 2, H, W)
        # bilinear weights sum to 1, so a resized logit errs by at most the largest head-logit error
        ties = int(((top[:, 0] - top[:, 1]) <= 2 * LAMBDA * sigma(f"logits/{head}", "element")).sum())
        exact_correct = _correct_pixels(run, head)
        assert abs(_correct_pixels(free32[0], head) - exact_correct) <= ties, head
        ref_correct = round(RECORDED.info["log_vars"][key] / 100 * labels.numel())
        assert abs(ref_correct - exact_correct) <= ties, head


def test_the_recording_is_a_float32_implementation_within_the_same_bounds(exact) -> None:
    """The recording (another CPU, another float32 implementation) passes the float32 bounds where its own
    branch choices cannot matter: the forward quantities and the gradients above every branch point."""
    reference = _q(exact[0])
    log_vars = RECORDED.info["log_vars"]
    for key, ref in (
        ("decode.loss_seg", "decode.loss_ce"),
        ("aux.loss_seg", "aux.loss_ce"),
        ("loss", "loss"),
    ):
        assert abs(log_vars[ref] - reference[f"loss/{key}"].item()) <= LAMBDA * sigma(f"loss/{key}"), key
    for module in step.BN_MODULES:
        for stat in ("running_mean", "running_var"):
            key = f"bn/{module}.{stat}"
            recorded = torch.from_numpy(RECORDED.arrays[f"{key}.after"]).double()
            assert (recorded - reference[key]).norm() <= LAMBDA * sigma(key), key
    for name in RECORDED.info["chosen"]:
        if name.startswith(TOP):
            key = f"grad/{name}"
            recorded = torch.from_numpy(RECORDED.arrays[key]).double()
            assert (recorded - reference[key]).norm() <= LAMBDA * sigma(key), name


def test_adamw_step_at_the_end_of_warmup(exact) -> None:
    check_adamw_step(exact[0], models.get_config(step.NAME, step.OVERRIDES))


def check_adamw_step(run: step.StepRun, config: models.config.SegmentorConfig) -> None:
    """The iteration-1500 AdamW step from our float64 gradients against the recorded float32 step.

    The first step moves each weight by ``-lr (g / (|g| + eps) + wd p)``. The recorded step used the
    recording's float32 gradient ``g_r``, within its floor ``f`` of the exact ``g``: where ``|g_r| > f`` both
    have one sign, and ``g / (|g| + eps)`` moves by at most ``eps f / (|g_r| - f + eps)^2``; the recorded
    update also carries the float32 rounding of the updated weight (two roundings of ``p``) and of the step.
    Where ``|g_r| <= f`` the recorded step's sign is rounding's choice: not compared.
    """
    model = step.fresh_model(torch.float64)
    for (name, ours), theirs in zip(model.named_parameters(), run.model.parameters(), strict=True):
        ours.grad = step.gradient(run, name).clone() if theirs.grad is None else theirs.grad.clone()
    optimizer = build_optimizer(model, config.optimizer)
    apply_lr(optimizer, 1500, config.schedule)
    lr_of = {}
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(
            RECORDED.info["step_iter1500_group_lr"][group["group_name"]], rel=1e-13
        )
        lr_of.update({id(p): group["lr"] for p in group["params"]})
    eps = optimizer.defaults["eps"]
    params = dict(model.named_parameters())
    before = {name: params[name].detach().clone() for name in RECORDED.info["chosen"]}
    optimizer.step()
    compared = 0
    for name, spec in RECORDED.info["chosen"].items():
        lr = lr_of[id(params[name])]
        ours = RECORDED.subsample(name, params[name].detach() - before[name])
        ref = RECORDED.arrays[f"delta1500/{name}"].astype(np.float64)
        g_r = np.abs(RECORDED.arrays[f"grad/{name}"].astype(np.float64))
        floor = spec["grad_float32_floor"]
        weights = np.abs(RECORDED.subsample(name, before[name]))
        reliable = g_r > floor
        bound = lr * eps * floor / (g_r - floor + eps) ** 2 + 2 * U32 * weights + 4 * U32 * lr
        assert (np.abs(ours - ref) <= bound)[reliable].all(), name
        compared += int(reliable.sum())
    assert compared > 10_000
