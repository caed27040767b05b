"""The run-level training knobs, declared once: params.yaml's ``runs.<run>.train`` and ``vitadapter train``'s flags.

:class:`TrainParams` is the only declaration of these knobs and their defaults. The command line's flags
are generated from its fields (:func:`add_knob_flags`), and flags and params.yaml go through the same
strict check (:mod:`pipelines.config.strict`: types, ``Literal`` options, minimums). ``None`` means "the
recipe's value" (or, for the batch, the plan's), so 0 is never a silent stand-in for "unset".

Each field says in its metadata whether it changes the trained weights (``defines_weights``): those, and
only those, make a finished run stale (:func:`weight_defining_knobs`, used by the run signature, DVC's
parameter dependencies and Prefect's cache key alike).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from pipelines.config.strict import ParamsError, build

Precision = Literal["fp32", "bf16", "fp16"]
NonFiniteSteps = Literal["stop", "skip"]


def knob(default: Any, help: str, *, minimum: int | None = None, weights: bool = False) -> Any:
    """A knob field: its default, the flag's help, an optional minimum, whether it changes the weights."""
    return field(default=default, metadata={"help": help, "min": minimum, "defines_weights": weights})


@dataclass(frozen=True)
class TrainParams:
    """Run-level training knobs (``None``: the recipe's value)."""

    max_iters: int | None = knob(
        None, "iterations (default: the recipe's); the lr schedule spans them", minimum=1, weights=True
    )
    batch_size: int | None = knob(
        None,
        "images per process and micro-step (default: global batch / processes, no accumulation: BatchNorm "
        "groups as the reference's SyncBN; a smaller value makes the rest gradient accumulation and smaller "
        "BatchNorm groups)",
        minimum=1,
        weights=True,
    )
    global_batch: int | None = knob(
        None, "images per optimizer step (default: the recipe's, 16)", minimum=1, weights=True
    )
    precision: Precision = knob("fp32", "fp32 (the reference's), bf16 or fp16 autocast", weights=True)
    tf32: bool = knob(
        True, "TF32 convolutions and matmuls on CUDA, as the reference ran (no effect on CPU)", weights=True
    )
    eval_interval: int | None = knob(
        None, "iterations between evaluations (default: the recipe's)", minimum=1
    )
    checkpoint_interval: int | None = knob(
        None, "iterations between checkpoints (default: the recipe's, 1000)", minimum=1
    )
    log_interval: int | None = knob(
        None, "iterations between log lines (default: the recipe's, 50)", minimum=1
    )
    keep_checkpoints: int = knob(1, "iteration checkpoints kept (the reference keeps 1)", minimum=1)
    seed: int = knob(
        0, "seed of the initialisation, the data order and the augmentations", minimum=0, weights=True
    )
    deterministic: bool = knob(False, "deterministic algorithms (slower on GPU)", weights=True)
    num_workers: int = knob(2, "data-loader processes per rank", minimum=0)
    pretrained: str = knob(
        "auto",
        "auto (the recipe's file from the weights folder, downloaded if possible), none, or a file path",
        weights=True,
    )
    eval_limit: int | None = knob(
        None, "evaluate during training on the first N validation images only", minimum=1
    )
    # what the next four do acts only on a step or a sample that went wrong (recorded when it happens: the
    # log, skipped_samples.jsonl, the recipe diff), so none of them makes a finished run stale
    nonfinite_steps: NonFiniteSteps = knob(
        "stop",
        "a step whose loss or gradient norm is not finite (fp32/bf16): stop the run naming it, or skip it "
        "(no update; counted and recorded in the recipe diff). fp16 always skips (the loss scaler)",
    )
    max_consecutive_skips: int = knob(
        300,
        "skipped steps in a row (non-finite, or fp16 overflow) after which the run stops as diverged",
        minimum=1,
    )
    skip_corrupt: bool = knob(
        False,
        "a training or validation sample that cannot be read or decoded: skip it (a training sample is "
        "replaced by the next readable one; counted, listed in skipped_samples.jsonl) instead of stopping",
    )
    debug_nan_at: int | None = knob(
        None,
        "debugging: make the training images of this iteration NaN, to see what a diverging step does "
        "(never for a real run)",
        minimum=1,
    )


def weight_defining_knobs() -> tuple[str, ...]:
    """The knobs whose change changes the trained weights (and so makes a finished run stale)."""
    return tuple(f.name for f in dataclasses.fields(TrainParams) if f.metadata["defines_weights"])


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_knob_flags(parser: argparse.ArgumentParser, cls: type = TrainParams) -> None:
    """One flag per field of ``cls``, with its help, type, choices and default shown."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group("run knobs (params.yaml: runs.<run>.train)")
    for f in dataclasses.fields(cls):
        annotation = hints[f.name]
        default = "the recipe's" if f.default is None else f.default
        help_text = (
            f"{f.metadata['help']} [default: {default}]" if f.default is not None else f.metadata["help"]
        )
        if annotation is bool:  # --name / --no-name; unset keeps the field's default
            group.add_argument(
                _flag(f.name), action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
            continue
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if typing.get_origin(annotation) is Literal:
            group.add_argument(
                _flag(f.name), choices=typing.get_args(annotation), default=None, help=help_text
            )
        else:
            kind = args[0] if args else annotation
            group.add_argument(_flag(f.name), type=kind, default=None, metavar=f.name.upper(), help=help_text)


def knobs_from_flags(args: argparse.Namespace, cls: type = TrainParams) -> Any:
    """The ``cls`` of the flags given (the others keep their defaults), checked like params.yaml."""
    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(cls)
        if getattr(args, f.name, None) is not None
    }
    try:
        return build(cls, given, "")
    except ParamsError as err:  # name the flag the user typed, not the params.yaml key
        message = str(err)
        for name in given:
            if message.startswith(f"{name}:"):
                message = _flag(name) + message[len(name) :]
        raise ParamsError(message) from None
