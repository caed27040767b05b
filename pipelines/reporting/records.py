"""What the pipeline records about its runs, without MLflow: names, tags, flattened params, the
published rows, the training-curve figure. :mod:`pipelines.reporting.tracking` sends these to MLflow.

Names (shared with the report): a training run (tags ``vitadapter.run=<run>``, ``vitadapter.kind=train``)
has the resolved config as flattened params (``backbone.trunk.embed_dim``), the run params under
``run.``, metrics by step (``train/<loss term>``, ``train/lr``, ``time_per_iter``, ``images_per_s``,
``peak_memory_mb``, ``val/mIoU``, ``val/aAcc``, ``val/mAcc``, ``system/*``), ``published_ss_mIoU`` /
``published_ms_mIoU`` / ``published_params_M``, after evaluation ``<mode>_mIoU`` / ``<mode>_delta_mIoU``,
the deformable-attention backend that ran (param ``deform_attn_backend``), its recipe diff (artifact
``recipe_diff.json``, metric ``recipe_deviations``, tag ``comparable_to_published``; evaluation runs too), and
its files. The reference
experiment holds one run per published row (named after the zoo entry) with ``ss_mIoU``, ``ms_mIoU``,
``params_M``: the metric names of our runs, side by side.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

import models
from pipelines.reporting.mlflow_views import percent

# what makes the MLflow 3 UI open an experiment on its model-training views (runs table, charts)
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# the run description the UI shows on a run page
DESCRIPTION_TAG = "mlflow.note.content"
TAG_RUN = "vitadapter.run"
# on a run re-opened in the fallback store: "<server uri>#<run id there>"
TAG_FAILED_OVER_FROM = "vitadapter.failed_over_from"
# on a run copied by `vitadapter tracking sync`: "<source uri>#<run id there>"
TAG_SYNCED_FROM = "vitadapter.synced_from"
TAG_KIND = "vitadapter.kind"
TAG_CHAIN = "vitadapter.chain"
TAG_ZOO = "vitadapter.zoo_entry"
TAG_MODE = "vitadapter.eval_mode"
# "no published row" on the runs of a user's dataset card (pipelines.config.datasets.NO_PUBLISHED_ROW)
TAG_PUBLISHED = "vitadapter.published"
TAG_LAST_CHECKPOINT = "vitadapter.last_checkpoint"
# on a training run that ended FAILED: the one-line reason (removed when a rerun resumes the run)
TAG_FAILURE = "vitadapter.failure"
TAG_BEST_CHECKPOINT = "vitadapter.best_checkpoint"
PARENT_TAG = "mlflow.parentRunId"  # what makes MLflow (and its UI) nest a run under another
KIND_TRAIN, KIND_EVAL, KIND_CHAIN = "train", "evaluation", "chain"
KIND_REPORT, KIND_REFERENCE = "report", "reference"
FALLBACK_DB = "mlflow-fallback.db"
FALLBACK_ARTIFACTS = "mlflow-fallback-artifacts"
TRAIN_FILES = ("config.json", "key_report.json", "train_log.jsonl", "skipped_samples.jsonl")
CURVE_ARTIFACT = "training_curve.png"
RECIPE_DIFF_ARTIFACT = "recipe_diff.json"  # pipelines.runs.recipe_diff, on training and evaluation runs
TAG_COMPARABLE = "comparable_to_published"  # "true" when the run's recipe diff has no deviation
HEADLINE_KEYS = frozenset({"loss", "lr"})
# counts of the training log (pipelines.engine.step_guard.StepHealth), logged as train/<key>
COUNT_KEYS = frozenset({"skipped_steps", "skipped_samples"})
LOSS_DECIMALS = 4
PERF_KEYS = frozenset({"time_per_iter", "images_per_s", "peak_memory_mb"})
VAL_KEYS = ("mIoU", "aAcc", "mAcc")
# MLflow 3's limits on one param / tag value; longer values are clipped (config.json keeps them whole)
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
CLIPPED = "...[clipped]"


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - len(CLIPPED)] + CLIPPED


def flatten_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings as MLflow params: dotted keys, JSON values (strings as is), clipped to MLflow's limit."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, name))
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            flat[name] = clip(text, MAX_PARAM_VALUE)
    return flat


def metric_name(key: str) -> str:
    """``key`` with the characters MLflow refuses in metric names replaced by ``_``."""
    return re.sub(r"[^\w./\- ]", "_", key)


def finite(values: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of ``values`` (None, NaN and non-numbers are left out)."""
    return {
        key: float(value)
        for key, value in values.items()
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    }


def evaluation_metrics(mode: str, metrics: Mapping[str, Any]) -> dict[str, float]:
    """The metrics of an evaluation run: plain names and ``<mode>_`` names (as on the training run)."""
    names = {"published_miou": "published_mIoU", "delta_miou": "delta_mIoU"}
    keys = ("mIoU", "aAcc", "mAcc", "num_images", "published_miou", "delta_miou", "skipped_samples")
    # percentages rounded as the published tables print them (the metric files keep every digit)
    plain = finite({names.get(key, key): percent(metrics.get(key)) for key in keys})
    prefixed = {
        f"{mode}_{k}" if k != "published_mIoU" else f"published_{mode}_mIoU": v for k, v in plain.items()
    }
    return {**plain, **{k: v for k, v in prefixed.items() if not k.endswith("num_images")}}


def _schedule(iterations: int) -> str:
    return f"{iterations // 1000}k" if iterations % 1000 == 0 else str(iterations)


# the tags our runs and the published rows share (row_tags)
ROW_TAG_KEYS = ("dataset", "head", "crop", "schedule", "pretrained")


def row_tags(config: Any, *, iterations: int | None = None) -> dict[str, str]:
    """The tags a published row and our runs share (one vocabulary: filter and group both alike in the UI)."""
    crop = config.data.train.crop_size
    values = (
        config.data.dataset,
        config.head,
        f"{crop[0]}x{crop[1]}",
        _schedule(iterations or config.schedule.max_iters),
        config.pretrained.name,
    )
    return dict(zip(ROW_TAG_KEYS, values, strict=True))


def reference_rows() -> dict[str, tuple[dict[str, float], dict[str, str], dict[str, str]]]:
    """(metrics, params, tags) of each published row: the seed table's entries and the COCO-Stuff stages."""
    configs = {name: models.get_config(name) for name in models.list_configs()}
    stage_of: dict[str, list[str]] = {}
    for name, config in configs.items():
        if config.pretrained.init_from:
            stage_of.setdefault(config.pretrained.init_from, []).append(name)
    rows = {}
    for name, config in configs.items():
        published = config.published
        if not (published.in_seed_table or name in stage_of):
            continue
        metrics = finite(
            {"ss_mIoU": published.miou_ss, "ms_mIoU": published.miou_ms, "params_M": published.params_m}
        )
        tags = {
            TAG_KIND: KIND_REFERENCE,
            TAG_ZOO: name,
            **row_tags(config),
            "row": "stage" if name in stage_of else "seed_table",
        }
        if name in stage_of:
            tags["stage_of"] = ", ".join(stage_of[name])
        params = {"reference_config": config.reference_config}
        if published.reference_num_params is not None:
            params["reference_num_params"] = str(published.reference_num_params)
        rows[name] = (metrics, params, tags)
    return rows


def training_curve(log_file: Path) -> Any:
    """A matplotlib figure of the total loss and the learning rate of ``train_log.jsonl`` (None if empty)."""
    if not log_file.is_file():
        return None
    records = [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()]
    if not records:
        return None
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state

    records = [record for record in records if "loss" in record]
    iterations = [record["iteration"] for record in records]
    figure = Figure(figsize=(9, 3.5), layout="constrained")
    loss_axes, lr_axes = figure.subplots(1, 2)
    # the total loss only: the per-term losses (30 for Mask2Former) are MLflow metrics under weighted_loss_terms/
    loss_axes.plot(iterations, [record["loss"] for record in records], color="tab:blue")
    loss_axes.set(xlabel="iteration", ylabel="total loss", title="training loss")
    loss_axes.grid(alpha=0.3)
    lr_axes.plot(iterations, [record.get("lr") for record in records], color="tab:orange")
    lr_axes.set(xlabel="iteration", ylabel="learning rate", title="learning rate")
    return figure


def quote(value: str) -> str:
    return f"'{value}'" if "'" not in value else f'"{value}"'


def final_status(status: str, caller: FrameType | None) -> str:
    """FAILED (KILLED) instead of FINISHED when an exception (interrupt) propagates through ``caller``:
    ``end_run()`` in a ``finally`` after a failed training, so that the rerun resumes the run."""
    error = sys.exc_info()[1]
    trace = None if error is None or status != "FINISHED" else error.__traceback__
    while trace is not None:
        if trace.tb_frame is caller:
            return "FAILED" if isinstance(error, Exception) else "KILLED"
        trace = trace.tb_next
    return status


class RunRecorder(Protocol):
    """What :class:`TrainingCallback` needs of a tracker (:class:`pipelines.reporting.tracking.Tracker`, which
    builds on this module: named by its methods, so that this module never imports it)."""

    def log_metrics(self, metrics: Mapping[str, Any], *, step: int) -> None: ...

    def set_tags(self, tags: Mapping[str, str]) -> None: ...


class TrainingCallback:
    """The trainer's :class:`pipelines.engine.trainer.Callback`, logging to the tracker's training run."""

    def __init__(self, tracker: RunRecorder) -> None:
        self.tracker = tracker

    def on_log(self, iteration: int, values: dict[str, float]) -> None:
        """Total loss and lr as ``train/loss``, ``train/lr`` (logged first: listed first on the run page), every
        per-term loss (as weighted in the total) under one prefix ``weighted_loss_terms/<key>`` (its charts
        section sorts after ``train`` and ``val``), throughput and memory unprefixed; at ``iteration``."""
        values = {**{k: values[k] for k in ("loss", "lr") if k in values}, **values}
        named = {
            key
            if key in PERF_KEYS
            else f"train/{key}"
            if key in HEADLINE_KEYS | COUNT_KEYS
            else f"weighted_loss_terms/{key}": value
            if key in PERF_KEYS or key == "lr" or not isinstance(value, float)
            else round(value, LOSS_DECIMALS)  # losses as mmseg logs them (4 decimals): a readable runs table
            for key, value in values.items()
        }
        self.tracker.log_metrics(named, step=iteration)

    def on_eval(self, iteration: int, metrics: dict[str, Any]) -> None:
        """``val/mIoU``, ``val/aAcc``, ``val/mAcc`` (and ``val/skipped_samples`` with ``skip_corrupt``) at step
        ``iteration``."""
        keys = (*VAL_KEYS, "skipped_samples") if "skipped_samples" in metrics else VAL_KEYS
        self.tracker.log_metrics({f"val/{key}": percent(metrics.get(key)) for key in keys}, step=iteration)

    def on_checkpoint(self, iteration: int, path: Path, best: bool) -> None:
        """Tag the last (or best) checkpoint's path and iteration."""
        key = TAG_BEST_CHECKPOINT if best else TAG_LAST_CHECKPOINT
        self.tracker.set_tags({key: str(path), f"{key}_iteration": str(iteration)})
