"""The recipe diff of a run: every way its effective setup differs from the published row it names.

A training run and an evaluation run each record one (:class:`RecipeDiff`): its run folder gets
``recipe_diff.json`` (training), its checkpoints carry it, the evaluation summary (``metrics/<run>/eval_*.json``)
holds it, MLflow gets it as a JSON artifact with the ``recipe_deviations`` metric and the
``comparable_to_published`` tag, and the report's "comparable" column is read from it. ``vitadapter run diff
RUN_DIR`` prints it.

What is compared with the published row (the zoo entry without overrides, docs/reference.md §R1-§R3, §S):

* training: ``iterations``, ``global_batch``, ``bn_group`` (images one BatchNorm normalises over: the
  reference's SyncBN spans the whole global batch), ``accumulation``, ``world_size``, ``crop``, ``precision``,
  ``tf32``, ``pretrained`` (the official file, another file, or random initialisation), ``init_from`` (the
  strategy-2 stage), ``dataset`` (the official distribution or a synthetic twin, from the shards' index),
  ``config`` (any other field changed by the preset or overrides) and ``preset``; and, once they happened,
  ``skipped_steps`` (non-finite steps dropped with ``nonfinite_steps: skip``; fp16's overflow skips belong to
  fp16 training, itself the ``precision`` deviation, and are only counted in the setup) and ``skipped_samples``
  (corrupt samples replaced with ``skip_corrupt``);
* evaluation: the training's deviations (prefixed ``training.``) when the checkpoint's run recorded them,
  ``eval_mode`` (a mode with no published number), ``eval_scales`` (changed test settings), ``eval_inference``
  (whole instead of slide), ``eval_precision`` (not the reference's: fp16 autocast for DeiT-T/S/B and
  AugReg-T/B, fp32 otherwise), ``tf32``, ``eval_images`` (a subset) and ``dataset``.

A difference that changes nothing the reference's numbers depend on is listed apart (``equivalent``): the
number of processes when the global batch and the BatchNorm groups are the reference's (the data stream
reads the same samples with the same augmentations), the deformable-attention kernel and gradient
checkpointing. A run is comparable with the published number when it has no deviation.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import models
from models.config import SegmentorConfig
from pipelines.config.datasets import NO_PUBLISHED_ROW

log = logging.getLogger(__name__)

RECIPE_DIFF_FILE = "recipe_diff.json"
Kind = Literal["training", "evaluation"]
# config paths compared as their own deviation, bookkeeping that changes no weights, implementation choices
# (the dataset and its class count are the ``dataset`` deviation)
_OWN_ITEMS = ("schedule.max_iters", "data.train.crop_size", "data.dataset", "num_classes")
_BOOKKEEPING = (
    "schedule.eval_interval",
    "schedule.checkpoint_interval",
    "schedule.log_interval",
    "schedule.max_keep_checkpoints",
    "notes",
)
_IMPLEMENTATION = ("deform_attn_backend", "backbone.with_cp", "decode_head.with_cp")
_EVAL_PREFIX = "data.eval."


@dataclass(frozen=True)
class Deviation:
    """One way the run differs from the published row.

    Attributes:
        key: what differs (``iterations``, ``bn_group``, ``dataset``, ``training.crop``, ...).
        published: the published row's value (the reference's).
        ours: this run's value.
        note: why it matters or what it means.
    """

    key: str
    published: Any
    ours: Any
    note: str = ""

    def line(self) -> str:
        if self.published is None and self.note == NO_PUBLISHED_ROW:  # own data: nothing to set it against
            return f"{self.key}: {_show(self.ours)}: {self.note}"
        note = f"  ({self.note})" if self.note else ""
        return f"{self.key}: published {_show(self.published)}, ours {_show(self.ours)}{note}"


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


@dataclass(frozen=True)
class RecipeDiff:
    """Every way one run differs from the published row of ``entry``.

    Attributes:
        entry: the zoo entry (published row) the run names.
        kind: ``training`` or ``evaluation``.
        deviations: the differences that make the run not comparable with the published number.
        equivalent: differences that change nothing the published number depends on.
        setup: the run's effective setup as recorded (weights and data checksums, plan, ...).
    """

    entry: str
    kind: Kind
    deviations: tuple[Deviation, ...] = ()
    equivalent: tuple[Deviation, ...] = ()
    setup: dict[str, Any] = field(default_factory=dict)

    @property
    def comparable(self) -> bool:
        """No deviation: the run's number can be set against the published one."""
        return not self.deviations

    @property
    def keys(self) -> list[str]:
        return [d.key for d in self.deviations]

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps({**asdict(self), "comparable": self.comparable}, default=str))

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> RecipeDiff:
        return cls(
            entry=value["entry"],
            kind=value["kind"],
            deviations=tuple(Deviation(**d) for d in value.get("deviations", ())),
            equivalent=tuple(Deviation(**d) for d in value.get("equivalent", ())),
            setup=dict(value.get("setup") or {}),
        )

    def text(self) -> str:
        """A readable listing (what ``vitadapter run diff`` prints)."""
        head = f"{self.kind} run of {self.entry}: "
        head += (
            "comparable with the published row" if self.comparable else f"{len(self.deviations)} deviation(s)"
        )
        lines = [head, *(f"  - {d.line()}" for d in self.deviations)]
        if self.equivalent:
            lines.append("  equivalent to the reference:")
            lines += [f"  - {d.line()}" for d in self.equivalent]
        return "\n".join(lines) + "\n"


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: tree}


def config_changes(config: SegmentorConfig) -> dict[str, tuple[Any, Any]]:
    """``{path: (published, ours)}`` for every config field that differs from the zoo entry's own."""
    ours, published = _leaves(config.to_dict()), _leaves(models.get_config(config.name).to_dict())
    return {
        path: (published.get(path), ours.get(path))
        for path in sorted(set(ours) | set(published))
        if ours.get(path) != published.get(path)
    }


def _config_deviations(
    changes: dict[str, tuple[Any, Any]], *, evaluation: bool, prefix: str = ""
) -> tuple[list[Deviation], list[Deviation]]:
    """The ``config`` (training) or ``eval_scales`` (evaluation) deviation, and the implementation choices."""
    implementation = [
        Deviation(prefix + path, old, new, "implementation choice, same numbers up to rounding")
        for path, (old, new) in changes.items()
        if path in _IMPLEMENTATION
    ]
    relevant = {
        path: pair
        for path, pair in changes.items()
        if path not in _IMPLEMENTATION + _OWN_ITEMS + _BOOKKEEPING
        and path.startswith(_EVAL_PREFIX) == evaluation
        and not (evaluation and path == "data.eval.fp16")
    }
    if not relevant:
        return [], implementation
    key, note = (
        ("eval_scales", "test pipeline or windows changed") if evaluation else ("config", "preset/overrides")
    )
    return [
        Deviation(
            prefix + key,
            {p: old for p, (old, _) in relevant.items()},
            {p: new for p, (_, new) in relevant.items()},
            note,
        )
    ], implementation


def _weights(config: SegmentorConfig, pretrained: Mapping[str, Any] | None) -> list[Deviation]:
    published = config.pretrained.file
    if pretrained is None:
        return [Deviation("pretrained", published, "random initialisation", "no pretrained trunk")]
    if Path(str(pretrained.get("file", ""))).name != published:
        return [
            Deviation("pretrained", published, pretrained.get("file"), "another file than the official one")
        ]
    return []


def _init_from(config: SegmentorConfig, init: Mapping[str, Any] | None) -> list[Deviation]:
    recipe = config.pretrained
    published = recipe.init_from_file or recipe.init_from
    if init is None:
        return [Deviation("init_from", published, None, f"does not start from the {recipe.init_from} stage")]
    recorded = init.get("recipe_diff")
    if recorded is not None:
        stage = RecipeDiff.from_dict(recorded)
        if stage.entry == recipe.init_from and stage.comparable:
            return []
        return [
            Deviation(
                "init_from",
                recipe.init_from,
                {"entry": stage.entry, "deviations": stage.keys},
                "the stage run it starts from is not the published stage",
            )
        ]
    if Path(str(init.get("file", ""))).name == recipe.init_from_file:
        return []
    return [Deviation("init_from", published, init.get("file"), "a checkpoint of unknown provenance")]


def dataset_deviations(dataset: Mapping[str, Any]) -> list[Deviation]:
    """``dataset`` unless the data are the official distribution (:func:`data.provenance.dataset_source`); a
    user's card reads ``dataset: <name> (K classes, own data): no published row``."""
    kind = dataset.get("kind")
    if kind == "official":
        return []
    if kind == "own":
        ours = f"{dataset.get('card')} ({dataset.get('num_classes')} classes, own data)"
        return [Deviation("dataset", None, ours, NO_PUBLISHED_ROW)]
    note = "a synthetic twin" if kind == "synthetic" else str(dataset.get("reason", "unknown source"))
    return [Deviation("dataset", "official distribution", kind, note)]


def training_diff(
    config: SegmentorConfig,
    plan: Any,
    *,
    pretrained: Mapping[str, Any] | None,
    init_from: Mapping[str, Any] | None,
    dataset: Mapping[str, Any],
    preset: str | None = None,
    health: Mapping[str, int] | None = None,
) -> RecipeDiff:
    """The recipe diff of training ``config`` (overrides applied) with ``plan``.

    Args:
        config: the effective zoo entry.
        plan: its :class:`pipelines.engine.plan.TrainPlan`.
        pretrained: the trunk loaded (``file``, ``sha256``), None for random initialisation; ignored for a
            strategy-2 entry, which starts from its stage (``init_from``).
        init_from: the stage checkpoint loaded (``file``, and the ``recipe_diff`` of the run that wrote
            it), None when none was.
        dataset: :func:`data.provenance.dataset_source` of the training data.
        preset: the preset applied, if known.
        health: the counts of skipped steps and samples so far
            (:meth:`pipelines.engine.step_guard.StepHealth.to_state`), None before training.
    """
    published = models.get_config(config.name)
    batch = plan.batch
    counts = dict(health or {})
    reference_world = published.data.train.gpus
    deviations: list[Deviation] = []
    equivalent: list[Deviation] = []

    def compare(key: str, ref: Any, ours: Any, note: str = "") -> None:
        if ours != ref:
            deviations.append(Deviation(key, ref, ours, note))

    if published.published.extension:
        deviations.append(
            Deviation("published", "a published row", None, "an extension entry: nothing published")
        )
    compare("iterations", published.schedule.max_iters, plan.max_iters)
    compare("global_batch", published.data.train.global_batch, batch.global_batch)
    compare("bn_group", batch.recipe_bn_group_size, batch.bn_group_size, "images per BatchNorm statistic")
    compare("accumulation", 1, batch.accumulation, "BatchNorm normalises over each micro-batch")
    if batch.world_size != reference_world:
        same_batches = (
            batch.global_batch == published.data.train.global_batch
            and batch.bn_group_size == batch.recipe_bn_group_size
            and batch.accumulation == 1
        )
        note = (
            "processes; the same samples, augmentations and BatchNorm groups" if same_batches else "processes"
        )
        world = Deviation("world_size", reference_world, batch.world_size, note)
        (equivalent if same_batches else deviations).append(world)
    compare("crop", list(published.data.train.crop_size), list(config.data.train.crop_size))
    compare("precision", "fp32", plan.precision)
    compare("tf32", True, plan.tf32, "the reference's CUDA convolutions and matmuls ran in TF32")
    if published.pretrained.init_from:
        deviations += _init_from(published, init_from)
    elif init_from is not None:  # fine-tuning from a checkpoint instead of the pretrained trunk
        deviations.append(
            Deviation(
                "init_from", None, init_from.get("file"), "starts from a checkpoint, not the pretrained trunk"
            )
        )
    else:
        deviations += _weights(published, pretrained)
    deviations += dataset_deviations(dataset)
    config_dev, implementation = _config_deviations(config_changes(config), evaluation=False)
    deviations += config_dev
    equivalent += implementation
    if preset:
        deviations.append(Deviation("preset", None, preset, "a different model size"))
    if counts.get("skipped_steps") and plan.precision != "fp16":
        note = "steps whose loss or gradient norm was not finite, dropped (nonfinite_steps: skip)"
        deviations.append(Deviation("skipped_steps", 0, counts["skipped_steps"], note))
    if counts.get("skipped_samples"):
        note = "corrupt samples replaced by the next readable one (skip_corrupt)"
        deviations.append(Deviation("skipped_samples", 0, counts["skipped_samples"], note))
    setup = {
        "plan": {
            "max_iters": plan.max_iters,
            "per_process": batch.per_process,
            "world_size": batch.world_size,
            "accumulation": batch.accumulation,
            "global_batch": batch.global_batch,
            "bn_group": batch.bn_group_size,
            "precision": plan.precision,
            "tf32": plan.tf32,
            "nonfinite_steps": getattr(plan, "nonfinite_steps", "stop"),
            "debug_nan_at": getattr(plan, "debug_nan_at", None),
        },
        "health": {k: counts.get(k, 0) for k in ("skipped_steps", "skipped_samples")},
        "pretrained": dict(pretrained) if pretrained else None,
        "init_from": {k: v for k, v in (init_from or {}).items() if k != "recipe_diff"} or None,
        "dataset": dict(dataset),
    }
    return RecipeDiff(config.name, "training", tuple(deviations), tuple(equivalent), setup)


def reference_eval_precision(config: SegmentorConfig) -> str:
    """How the reference's test.py ran the published row (docs/reference.md §R2.6)."""
    return "fp16" if models.get_config(config.name).data.eval.fp16 else "fp32"


def evaluation_diff(
    config: SegmentorConfig,
    *,
    mode: str,
    precision: str,
    tf32: bool,
    inference: str,
    num_images: int,
    limit: int | None,
    dataset: Mapping[str, Any],
    training: Mapping[str, Any] | None,
) -> RecipeDiff:
    """The recipe diff of evaluating ``config`` (overrides applied) in ``mode``.

    Args:
        config: the effective zoo entry.
        mode: ``ss`` or ``ms``.
        precision: the precision that ran.
        tf32: the TF32 setting.
        inference: ``slide`` or ``whole``.
        num_images: images evaluated.
        limit: the image limit given, if any.
        dataset: :func:`data.provenance.dataset_source` of the evaluation data.
        training: the recorded training diff of the checkpoint's run (None: a checkpoint not trained here,
            e.g. the official release; recorded as such, not counted).
    """
    published = models.get_config(config.name)
    deviations: list[Deviation] = []
    equivalent: list[Deviation] = []
    if training is not None:
        trained = RecipeDiff.from_dict(training)
        deviations += [
            Deviation(f"training.{d.key}", d.published, d.ours, d.note) for d in trained.deviations
        ]
        equivalent += [
            Deviation(f"training.{d.key}", d.published, d.ours, d.note) for d in trained.equivalent
        ]
    if published.published.miou(mode) is None:
        deviations.append(Deviation("eval_mode", "a published mode", mode, "no published number to compare"))
    scales, implementation = _config_deviations(config_changes(config), evaluation=True)
    deviations += scales
    equivalent += implementation
    if inference != published.data.eval.mode:
        deviations.append(Deviation("eval_inference", published.data.eval.mode, inference))
    reference_precision = reference_eval_precision(config)
    if precision != reference_precision:
        deviations.append(
            Deviation("eval_precision", reference_precision, precision, "not how test.py ran it")
        )
    if not tf32:
        deviations.append(Deviation("tf32", True, False, "the reference's CUDA products ran in TF32"))
    if limit is not None:
        deviations.append(
            Deviation("eval_images", "the whole validation split", num_images, f"limit {limit}")
        )
    deviations += dataset_deviations(dataset)
    setup = {
        "mode": mode,
        "precision": precision,
        "tf32": tf32,
        "inference": inference,
        "num_images": num_images,
        "dataset": dict(dataset),
        "checkpoint_trained_here": training is not None,
    }
    return RecipeDiff(config.name, "evaluation", tuple(deviations), tuple(equivalent), setup)


def write_diff(folder: Path, diff: RecipeDiff) -> Path:
    """Write ``diff`` as the folder's ``recipe_diff.json``."""
    from data.atomic import write_json_atomic

    path = Path(folder) / RECIPE_DIFF_FILE
    write_json_atomic(path, diff.to_dict())
    return path


def read_diff(folder_or_file: str | Path) -> RecipeDiff | None:
    """The diff of a run folder (or a ``recipe_diff.json``), None when there is none."""
    path = Path(folder_or_file)
    if path.is_dir():
        path = path / RECIPE_DIFF_FILE
    if not path.is_file():
        return None
    return RecipeDiff.from_dict(json.loads(path.read_text()))


def folder_training_diff(run_dir: str | Path) -> dict[str, Any] | None:
    """The training diff a run folder recorded (its ``recipe_diff.json``), as a dict; None before training."""
    diff = read_diff(Path(run_dir))
    return None if diff is None else diff.to_dict()


def recorded_training_diff(checkpoint: str | Path) -> dict[str, Any] | None:
    """The training diff recorded beside a checkpoint (its run folder's ``recipe_diff.json``), as a dict;
    None for a checkpoint not trained here (e.g. the official release)."""
    return folder_training_diff(Path(checkpoint).parent)


def log_summary(diff: RecipeDiff) -> None:
    """One log line: comparable, or the deviations by name (a warning)."""
    if diff.comparable:
        log.info("%s run of %s: comparable with the published row", diff.kind, diff.entry)
    else:
        log.warning(
            "%s run of %s differs from the published row: %s", diff.kind, diff.entry, ", ".join(diff.keys)
        )
