"""The recorded training step of UperNet + ViT-Adapter-T (docs/reference.md §T), run the ways the tests need.

One forward/backward of the recording's model and batch, in float32 or float64, with the branch choices
(ReLU masks, max-pool picks) free, recorded or imposed (tests/rounding.py :class:`BranchPins`), optionally
under float32's emulated rounding (:func:`rounding.emulated_float32`). :func:`quantities` turns a run into
the flat float64 arrays the tests compare (losses, BatchNorm statistics, the recorded gradient subsamples,
the heads' logits) and :func:`spreads` the emulated runs into their rounding spreads, which
``tools/rounding_bounds.py`` stores in ``tests/fixtures/reference/`` for the tests.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

import models
from models.checkpoint import load_official_state_dict
from reference_data import TrainStepGolden, fill_state_dict, load_manifest, load_train_step
from rounding import RUNS, BranchPins, emulated_float32, spread

NAME = "upernet_deit_adapter_tiny_512_160k_ade20k"
FIXTURE = "upernet_deit_adapter_tiny_96x128"
# the recording's model changes (docs/reference.md §T): no drop path, no dropout; the PyTorch deformable
# attention core, as recorded
OVERRIDES = {
    "backbone.trunk.drop_path_rate": 0.0,
    "decode_head.dropout_ratio": 0.0,
    "auxiliary_head.dropout_ratio": 0.0,
    "deform_attn_backend": "pytorch",
}
LOSSES = ("decode.loss_seg", "aux.loss_seg", "loss")
BN_MODULES = ("backbone.spm.stem.1", "decode_head.fpn_bottleneck.bn", "auxiliary_head.convs.0.bn")
HEADS = ("decode_head", "auxiliary_head")
Branches = Literal["record", "impose"]


def golden() -> TrainStepGolden:
    return load_train_step(FIXTURE)


def batch(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The recorded batch: float64 randn seed 11 (float32: cast down), labels randint seed 12, 16x16 ignored."""
    img = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    labels = torch.randint(0, 150, (2, 1, 96, 128), generator=torch.Generator().manual_seed(12))
    labels[:, :, :16, :16] = 255
    return img.to(dtype), labels[:, 0]


@functools.cache
def _filled() -> nn.Module:
    """The recording's model: the fill-rule weights loaded through the official-checkpoint converter."""
    model = models.create_segmentor(NAME, OVERRIDES)
    report = load_official_state_dict(model, fill_state_dict(load_manifest(NAME), model.state_dict()))
    if not report.complete:
        raise AssertionError(f"the fill does not cover the model: {report}")
    return model


def fresh_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    """A train-mode copy of the filled model (float32 weights, cast up exactly for float64)."""
    return copy.deepcopy(_filled()).train().to(dtype)


@dataclass
class StepRun:
    """What one forward/backward left: the model (its gradients and BatchNorm buffers), losses, logits."""

    model: nn.Module
    losses: dict[str, torch.Tensor]
    logits: dict[str, torch.Tensor] = field(default_factory=dict)  # head -> its output (before resizing)

    def grad(self, name: str) -> torch.Tensor | None:
        return dict(self.model.named_parameters())[name].grad


def gradient(run: StepRun, name: str) -> torch.Tensor:
    """``name``'s gradient, zeros where none reached it (a detached path): compared, never skipped."""
    grad = run.grad(name)
    return torch.zeros_like(dict(run.model.named_parameters())[name]) if grad is None else grad


def run_step(
    dtype: torch.dtype,
    *,
    pins: BranchPins | None = None,
    branches: Branches = "record",
    emulate_seed: int | None = None,
    model: nn.Module | None = None,
) -> StepRun:
    """One forward/backward of the recorded batch.

    Args:
        dtype: float32 (what training computes) or float64 (exact arithmetic's stand-in).
        pins: where the run's own branch choices are recorded (``branches="record"``: the run is free) or
            where they are taken from (``"impose"``); either way the branch inputs go to ``pins.inputs``.
        emulate_seed: run under float32's emulated rounding with this seed (float64 only).
        model: the model to run (default: a fresh copy of the filled model); tests plant bugs this way.
    """
    model = fresh_model(dtype) if model is None else model
    img, labels = batch(dtype)
    logits: dict[str, torch.Tensor] = {}
    hooks = [
        getattr(model, head).register_forward_hook(
            lambda _module, _inputs, out, head=head: logits.__setitem__(head, out.detach().clone())
        )
        for head in HEADS
    ]
    with contextlib.ExitStack() as stack:
        if pins is not None:
            stack.enter_context(pins.record(model) if branches == "record" else pins.impose(model))
        if emulate_seed is not None:
            mode = stack.enter_context(emulated_float32(emulate_seed))
            img = img.clone()
            mode.perturb(img, img.abs())  # the float32 image is the float64 one, rounded
        losses = model.loss(img, labels)
        losses["loss"].backward()
    for hook in hooks:
        hook.remove()
    return StepRun(model=model, losses={k: v.detach() for k, v in losses.items()}, logits=logits)


def quantities(run: StepRun, recorded: TrainStepGolden) -> dict[str, torch.Tensor]:
    """The compared quantities of a run as flat float64 tensors, keyed ``loss/``, ``bn/``, ``grad/``,
    ``logits/`` (the gradients at the recording's stored subsample)."""
    out = {f"loss/{key}": run.losses[key].double().reshape(1) for key in LOSSES}
    state = run.model.state_dict()
    for module in BN_MODULES:
        for stat in ("running_mean", "running_var"):
            out[f"bn/{module}.{stat}"] = state[f"{module}.{stat}"].double().reshape(-1)
    for name in recorded.info["chosen"]:
        out[f"grad/{name}"] = torch.from_numpy(recorded.subsample(name, gradient(run, name)))
    for head, value in run.logits.items():
        out[f"logits/{head}"] = value.double().reshape(-1)
    return out


def exact_run(model: nn.Module | None = None) -> tuple[StepRun, BranchPins]:
    """The float64 run whose branch choices the others follow (exact arithmetic's, to float64 rounding)."""
    pins = BranchPins()
    return run_step(torch.float64, pins=pins, branches="record", model=model), pins


def spreads(recorded: TrainStepGolden, seeds: Iterator[int] | None = None) -> dict[str, dict]:
    """Float32's emulated rounding spread of every quantity, and of every branch input (the tie bands).

    Runs :data:`rounding.RUNS` emulated float64 steps (branches pinned to the exact run's, so that the
    spread is rounding's alone) and compares each with the exact run.
    """
    exact, pins = exact_run()
    reference = quantities(exact, recorded)
    branch_inputs = {name: value.double() for name, value in pins.inputs.items()}
    names = list(recorded.info["chosen"])
    deviations: dict[str, list[torch.Tensor]] = {key: [] for key in reference}
    branch_deviations: dict[str, list[torch.Tensor]] = {name: [] for name in branch_inputs}
    norm_deviations: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    for seed in seeds if seeds is not None else range(RUNS):
        run = run_step(torch.float64, pins=pins, branches="impose", emulate_seed=seed)
        for key, value in quantities(run, recorded).items():
            deviations[key].append(value - reference[key])
        for name, value in pins.inputs.items():
            branch_deviations[name].append(value.double() - branch_inputs[name])
        for name in names:  # the whole gradient, for its norm
            norm_deviations[name].append((gradient(run, name) - gradient(exact, name)).norm().reshape(1))
    return {
        "quantities": {
            key: {**spread(values), "exact_norm": float(reference[key].norm())}
            for key, values in deviations.items()
        },
        "gradient_norms": {name: spread(values) for name, values in norm_deviations.items()},
        "branches": {name: spread(values) for name, values in branch_deviations.items()},
    }
