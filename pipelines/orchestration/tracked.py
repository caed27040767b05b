"""Training and evaluation recorded in MLflow the same way whoever starts them: the pipeline's stages
(``dvc repro``, Prefect) and the stand-alone ``vitadapter train`` / ``vitadapter evaluate`` commands.

A training run is one MLflow run (resumed while unfinished) with the datasets it read, per-iteration losses,
lr and validation mIoU, the backend that ran, the recipe diff, the model and the run folder's files; an
evaluation is a run under it (:class:`pipelines.reporting.tracking.Tracker`).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import cuda_ops
from data.atomic import file_sha256
from pipelines.config.params import DEFAULT_PATHS, RunParams, Tracking
from pipelines.reporting.mlflow_views import DatasetInput, dataset_input
from pipelines.reporting.records import MAX_TAG_VALUE, TAG_FAILURE, clip
from pipelines.runs.evaluation import backends_label
from pipelines.runs.folder import CONFIG_FILE, TRAIN_LOG
from pipelines.runs.recipe_diff import folder_training_diff
from pipelines.runs.training import RunSpec, TrainResult

log = logging.getLogger(__name__)

STAGE_ENV = "VITADAPTER_STAGE"
FLOW_RUN_ENV = "VITADAPTER_FLOW_RUN_ID"


def data_inputs(data_dir: Path, splits: dict[str, str]) -> list[DatasetInput]:
    """The ``{split: context}`` splits of a shard folder as MLflow dataset inputs (unreadable ones left out)."""
    found = (dataset_input(Path(data_dir), split, context) for split, context in splits.items())
    return [item for item in found if item is not None]


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def run_tags(
    name: str, run: RunParams, *, dataset: str, index_sha256: str, stage: str, overrides: dict[str, Any]
) -> dict[str, str]:
    """The tags of a training or evaluation run: what ran, on which data, from which commit and stage."""
    tags = {
        "vitadapter.run": name,
        "vitadapter.zoo_entry": run.config,
        "vitadapter.dataset": dataset,
        "vitadapter.data_index_sha256": index_sha256,
        "vitadapter.dvc_stage": os.environ.get(STAGE_ENV, stage),
        "vitadapter.preset": run.preset or "",
        "vitadapter.overrides": json.dumps(overrides, sort_keys=True),
        "vitadapter.params": json.dumps(asdict(run.train), sort_keys=True),
    }
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    flow_run = os.environ.get(FLOW_RUN_ENV)
    if flow_run:
        tags["vitadapter.prefect_flow_run_id"] = flow_run
    return tags


def train_tracked(
    spec: RunSpec,
    tracker: Any,
    *,
    run_name: str,
    run: RunParams,
    tags: dict[str, str],
    parent: str | None,
    training_diff: Callable[[], dict[str, Any] | None],
) -> tuple[TrainResult, str]:
    """Train ``spec`` recording it on ``tracker`` (a :class:`pipelines.reporting.tracking.Tracker`, or None
    for no tracking); returns the result and the deformable-attention backends that ran.

    The MLflow run is ended FAILED (KILLED on an interrupt) when training raises, so that a rerun resumes it;
    a failed run gets the one-line reason as tag ``vitadapter.failure`` and its run folder's files (the
    training log ends with the same reason).
    """
    from pipelines.reporting.records import TrainingCallback
    from pipelines.runs.training import run_training

    callbacks = []
    if tracker is not None:
        tracker.start_training_run(
            run_name=run_name,
            config=spec.config(),
            run_params=run,
            tags=tags,
            parent=parent,
            inputs=data_inputs(spec.data, {"train": "training", "val": "evaluation"}),
        )
        callbacks.append(TrainingCallback(tracker))
    before = cuda_ops.backend_usage()
    try:
        result = run_training(spec, callbacks=callbacks)
    except BaseException as err:
        if tracker is not None:
            if isinstance(err, Exception):
                tracker.set_tags({TAG_FAILURE: clip(f"{type(err).__name__}: {err}", MAX_TAG_VALUE)})
                tracker.log_run_files(spec.work_dir)
            tracker.end_run("FAILED")
        raise
    backend = backends_label(cuda_ops.usage_since(before))
    if tracker is not None:
        tracker.log_params({"deform_attn_backend": backend})
        diff = training_diff()
        if diff is not None:
            tracker.log_recipe_diff(diff)
        weights = result.best_checkpoint or result.last_checkpoint
        if weights is not None:  # the MLflow model (pyfunc), registered under the zoo entry's name
            tracker.log_model(checkpoint=Path(weights), config=spec.config(), overrides=spec.overrides)
        tracker.end_run()
    return result, backend


# -- the stand-alone commands ----------------------------------------------------------------------


def command_tracker(uri: str | None, experiment: str, *, enabled: bool) -> Any:
    """The tracker of a stand-alone command: ``uri`` (default ``$MLFLOW_TRACKING_URI``, else the pipeline's
    ``sqlite:///mlflow.db``) and ``experiment``; None with tracking off."""
    if not enabled:
        return None
    from pipelines.reporting.tracking import Tracker

    settings = Tracking(
        uri=uri or os.environ.get("MLFLOW_TRACKING_URI") or Tracking.uri, experiment=experiment
    )
    return Tracker(settings, fallback_dir=Path(DEFAULT_PATHS.tracking_fallback))


def standalone_run(spec: RunSpec) -> RunParams:
    """The params.yaml entry a stand-alone ``vitadapter train`` is equivalent to (what MLflow records)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    uses_gpus = spec.device != "cpu" and world > 1
    return RunParams(
        config=spec.name,
        preset=spec.preset,
        overrides=dict(spec.overrides),
        init_from=spec.init_from,
        train=spec.knobs,
        gpus=per_node if uses_gpus else 0,
        nodes=max(world // max(per_node, 1), 1) if uses_gpus else 1,
    )


def index_digest(data_dir: Path) -> str:
    """sha256 of a shard folder's ``index.json`` ('' when it has none)."""
    index = Path(data_dir) / "index.json"
    return file_sha256(index) if index.is_file() else ""


def train_command_tracked(spec: RunSpec, tracker: Any) -> TrainResult:
    """``vitadapter train``: the training, recorded as the pipeline's train stage records its runs (the run
    is named after the run folder)."""
    run = standalone_run(spec)
    name = spec.work_dir.name
    tracker = tracker if int(os.environ.get("RANK", "0")) == 0 else None  # rank 0 reports, as in the stages
    tags = run_tags(
        name,
        run,
        dataset=spec.config().data.dataset,
        index_sha256=index_digest(spec.data),
        stage="vitadapter train",
        overrides=dict(spec.overrides),
    )
    result, _ = train_tracked(
        spec,
        tracker,
        run_name=name,
        run=run,
        tags=tags,
        parent=None,
        training_diff=lambda: folder_training_diff(spec.work_dir),
    )
    if tracker is not None:
        tracker.log_run_files(spec.work_dir)
    return result


def evaluation_run_name(checkpoint: Path) -> str:
    """The training run an evaluated checkpoint belongs to: its run folder's name when it lies in one (a
    training checkpoint), else the file's stem (an imported or official file)."""
    folder = Path(checkpoint).resolve().parent
    if (folder / TRAIN_LOG).is_file() or (folder / CONFIG_FILE).is_file():
        return folder.name
    return Path(checkpoint).stem


def log_command_evaluation(
    tracker: Any,
    *,
    checkpoint: Path,
    data: Path,
    config: Any,
    overrides: dict[str, Any],
    summary: dict[str, Any],
    per_class: dict[str, list],
    confusion_files: list[Path] | None,
) -> None:
    """``vitadapter evaluate``: the evaluation as an MLflow run, under the training run of the checkpoint's
    run folder when MLflow has it (as the pipeline's evaluate stage records its evaluations)."""
    if tracker is None:
        return
    name = evaluation_run_name(checkpoint)
    tags = run_tags(
        name,
        RunParams(config=config.name),
        dataset=config.data.dataset,
        index_sha256=index_digest(data),
        stage="vitadapter evaluate",
        overrides=overrides,
    )
    tracker.log_evaluation(
        run_name=name,
        mode=summary["mode"],
        metrics={"run": name, **summary},
        per_class=per_class,
        artifacts=[],
        tags=tags,
        confusion_files=confusion_files,
        inputs=data_inputs(data, {"val": "evaluation"}),
    )
