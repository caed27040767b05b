"""One training run of a zoo entry: the one place where config, data, weights, plan and trainer meet.

``run_training`` builds the segmentor from the zoo (preset and overrides applied), loads the pretrained
trunk (docs/reference.md §R2.2) or, for the strategy-2 rows, the COCO-Stuff stage checkpoint with the
class-specific layer left at its fresh initialisation, resolves the plan (:mod:`pipelines.engine.plan`),
opens the prepared shards, and trains with :class:`pipelines.engine.trainer.Trainer`, evaluating
single-scale on the validation split through :func:`pipelines.runs.evaluation.evaluate_model`.
Before training it writes the run's recipe diff (``recipe_diff.json``, :mod:`pipelines.runs.recipe_diff`:
every way the run differs from the published row), which every checkpoint also carries.
Rerunning the same call resumes from the run folder's latest checkpoint. Launch it under ``torchrun``
for several GPUs or nodes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import models
from data.atomic import WriteError, write_json_atomic
from data.catalog import get_dataset
from data.provenance import dataset_source
from models.checkpoint import LoadReport, load_checkpoint_file, load_stage_checkpoint
from models.config import SegmentorConfig
from models.finetune import load_init_checkpoint
from models.pretrained import load_pretrained_trunk
from pipelines.config.datasets import is_own_data, shards_dataset
from pipelines.config.knobs import TrainParams
from pipelines.config.params import DEFAULT_PATHS
from pipelines.config.specs import train_pipeline
from pipelines.engine.distributed import DevicePreference, DistInfo, init_distributed
from pipelines.engine.plan import TrainPlan, resolve_plan
from pipelines.engine.step_guard import StepHealth
from pipelines.engine.trainer import Callback, Trainer, TrainResult
from pipelines.runs import evaluation, recipe_diff
from pipelines.runs.folder import CONFIG_FILE, KEY_REPORT, RunFolder
from pipelines.runs.inputs import check_shards_match, class_names
from pipelines.runs.recipe_diff import RecipeDiff
from pipelines.runs.weights import resolve_weights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSpec:
    """What to train and with which inputs.

    Attributes:
        name: zoo entry.
        data: prepared shard folder of the entry's dataset.
        work_dir: the run folder (rerunning with the same folder resumes).
        knobs: the run-level knobs (iterations, batch, precision, ...).
        overrides: zoo overrides by full path (:func:`models.zoo.resolved_overrides`), recorded in checkpoints.
        init_from: strategy-2 stage checkpoint: ``"auto"`` (for entries with a stage 1: the stage run's
            final checkpoint under ``runs_dir``, else the released file in ``weights_dir``), ``"none"``, a
            run folder (its final checkpoint; the pipeline's hand-off) or a file path (any entry: the run
            starts from that checkpoint of the same architecture; the class-dependent layers start fresh when
            its classes differ, any other missing or mis-shaped key is an error).
        weights_dir: folder of pretrained and released files.
        runs_dir: folder of run folders (for ``init_from="auto"``).
        device: ``auto``, ``cpu`` or ``cuda``.
        eval_batch_windows: sliding windows per forward at evaluation.
        progress: a progress bar on rank 0.
        preset: the preset already merged into ``overrides``, named in the run's recipe diff.
    """

    name: str
    data: Path
    work_dir: Path
    knobs: TrainParams = field(default_factory=TrainParams)
    overrides: dict[str, Any] = field(default_factory=dict)
    init_from: str = "auto"
    weights_dir: Path = Path(DEFAULT_PATHS.weights)
    runs_dir: Path = Path(DEFAULT_PATHS.runs)
    device: DevicePreference = "auto"
    eval_batch_windows: int = 4
    progress: bool = True
    preset: str | None = None

    def config(self) -> SegmentorConfig:
        shards_dataset(self.data)  # a card's shards: its classes known to the zoo's checks
        return models.get_config(self.name, self.overrides)


def _load_pretrained(model: nn.Module, config: SegmentorConfig, spec: RunSpec) -> dict[str, Any] | None:
    if spec.knobs.pretrained == "none":
        log.warning(
            "no pretrained trunk: %s starts from its initialisation (not the reference recipe)", config.name
        )
        return None
    recipe = config.pretrained
    path, digest = resolve_weights(
        recipe.file,
        recipe.url,
        weights_dir=spec.weights_dir,
        path=None if spec.knobs.pretrained == "auto" else spec.knobs.pretrained,
    )
    report, resized = load_pretrained_trunk(
        model.backbone, load_checkpoint_file(path), config.backbone.trunk.kind, source=str(path)
    )
    return {"file": str(path), "sha256": digest, "resized": resized, **report.to_dict()}


def stage_run_folder(config: SegmentorConfig, spec: RunSpec) -> RunFolder | None:
    """The run folder a strategy-2 run starts from: ``init_from`` naming a folder (the pipeline's hand-off from
    the run its ``init_from`` names), or, for ``"auto"``, the stage's folder under ``runs_dir`` once it holds an
    iteration checkpoint; None for a checkpoint file, the released file or no stage."""
    if spec.init_from not in ("auto", "none"):
        given = Path(spec.init_from)
        return RunFolder(given) if given.is_dir() else None
    if spec.init_from == "none" or config.pretrained.init_from is None:
        return None
    stage = RunFolder(spec.runs_dir / config.pretrained.init_from)
    return stage if stage.latest_checkpoint() is not None else None


def stage_checkpoint_path(config: SegmentorConfig, spec: RunSpec) -> Path | None:
    """The checkpoint a strategy-2 run starts from, or None when the entry has no stage 1.

    From a run folder (:func:`stage_run_folder`) it is the run's final checkpoint
    (:meth:`pipelines.runs.folder.RunFolder.final_checkpoint`), never the best-mIoU one: the starting weights
    follow from the stage's training definition alone (docs/reference.md §R2.2).
    """
    recipe = config.pretrained
    folder = stage_run_folder(config, spec)
    if folder is not None:
        return folder.final_checkpoint()
    if spec.init_from not in ("auto", "none"):
        return Path(spec.init_from)  # an explicit checkpoint, also for entries without a stage 1
    if recipe.init_from is None or spec.init_from == "none":
        return None
    if recipe.init_from_file and (spec.weights_dir / recipe.init_from_file).is_file():
        return spec.weights_dir / recipe.init_from_file
    stage = RunFolder(spec.runs_dir / recipe.init_from)
    raise FileNotFoundError(
        f"{config.name} starts from the {recipe.init_from} stage (docs/reference.md §R2.2): train that stage "
        f"first (its run folder {stage.path}) or download {recipe.init_from_url} (unzip it) "
        f"to {spec.weights_dir / (recipe.init_from_file or '')}; or pass init_from='none'"
    )


def check_finished_stage(state: dict[str, Any], source: Path) -> None:
    """Refuse a stage checkpoint from a run folder that stopped before its planned iterations.

    Raises:
        ValueError: naming the checkpoint, its iteration and the planned ones.
    """
    planned = (state.get("plan") or {}).get("schedule", {}).get("max_iters")
    iteration = state.get("iteration")
    if isinstance(planned, int) and isinstance(iteration, int) and iteration < planned:
        raise ValueError(
            f"{source}: the stage run stopped at iteration {iteration} of {planned}; a later run starts from "
            f"the stage's final checkpoint (docs/reference.md §R2.2): finish its training first (rerun it)"
        )


def load_stage(model: nn.Module, path: Path) -> LoadReport:
    """Strategy-2 hand-off (docs/reference.md §R2.2): every tensor whose name and shape match is copied;
    the class-specific layers (shapes differ) get PyTorch's default initialisation; optimizer state and
    iteration are not carried (the new run starts its schedule at 0)."""
    return load_stage_checkpoint(model, load_checkpoint_file(path), source=str(path))


def checkpoint_classes(state: dict[str, Any]) -> tuple[str, ...] | None:
    """The class names a checkpoint was trained on, where it records them (a card's record, its zoo entry and
    overrides, or mmsegmentation's ``meta.CLASSES``); None when it does not say."""
    record = state.get("dataset")
    if isinstance(record, dict) and isinstance(record.get("class_names"), list):
        return tuple(str(name) for name in record["class_names"])
    meta = state.get("meta") if isinstance(state.get("meta"), dict) else {}
    if isinstance(meta.get("CLASSES"), list | tuple):
        return tuple(str(name) for name in meta["CLASSES"])
    entry = state.get("config") if isinstance(state.get("config"), str) else meta.get("zoo_entry")
    overrides = state.get("overrides") if isinstance(state.get("overrides"), dict) else {}
    try:
        dataset = overrides.get("data.dataset") or models.get_config(str(entry)).data.dataset
        return tuple(get_dataset(str(dataset)).class_names) if entry else None
    except (KeyError, ValueError):
        return None


def init_from_checkpoint(
    model: nn.Module,
    config: SegmentorConfig,
    path: Path,
    keys: dict[str, Any],
    *,
    finished_stage: bool = False,
) -> None:
    """Start ``model`` from the checkpoint ``path`` (a strategy-2 stage, or any checkpoint of the same
    architecture, e.g. to fine-tune on a card): every entry must match in name and shape except the
    class-dependent layers, which start fresh when the classes differ (:func:`models.finetune.load_init_checkpoint`);
    the key report records what was loaded and what was re-initialised. ``finished_stage``: ``path`` is a
    stage run's final checkpoint, which must come from a run that reached its planned iterations."""
    state = load_checkpoint_file(path)
    if finished_stage:
        check_finished_stage(state, path)
    recorded = checkpoint_classes(state)
    ours = tuple(class_names(config))
    same = None if recorded is None else (recorded == ours)
    report = load_init_checkpoint(model, config, state, same_classes=same, source=str(path))
    keys["init_from"] = report.to_dict()
    # what the recipe diff judges the start by: the stage run's own diff, or the file's name
    keys["init_from_checkpoint"] = {"file": str(path), "recipe_diff": state.get("recipe_diff")}
    log.info(
        "initialised from %s (%d tensors); re-initialised (%s): %s",
        path,
        len(report.load.loaded),
        report.reason,
        ", ".join(report.reinitialised) or "none",
    )


def build_model(spec: RunSpec, config: SegmentorConfig) -> tuple[nn.Module, dict[str, Any]]:
    """The initialised model and the key report of what was loaded into it."""
    torch.manual_seed(spec.knobs.seed)
    model = models.build_segmentor(config)
    keys: dict[str, Any] = {"config": config.name, "overrides": spec.overrides}
    stage = stage_checkpoint_path(config, spec)
    if stage is not None:
        init_from_checkpoint(
            model, config, stage, keys, finished_stage=stage_run_folder(config, spec) is not None
        )
    else:
        keys["pretrained"] = _load_pretrained(model, config, spec)
    return model, keys


def plan_for(
    spec: RunSpec, config: SegmentorConfig, world_size: int, *, bn_spans_processes: bool = True
) -> TrainPlan:
    """The resolved plan of ``spec`` on ``world_size`` processes (``bn_spans_processes``: SyncBatchNorm runs,
    i.e. CUDA)."""
    return resolve_plan(
        config,
        spec.knobs,
        world_size=world_size,
        work_dir=spec.work_dir,
        progress=spec.progress,
        bn_spans_processes=bn_spans_processes,
    )


def training_recipe_diff(
    spec: RunSpec,
    config: SegmentorConfig,
    plan: TrainPlan,
    keys: dict[str, Any],
    health: StepHealth | None = None,
) -> RecipeDiff:
    """The run's recipe diff (:mod:`pipelines.runs.recipe_diff`) from its plan, what was loaded and the steps
    and samples skipped so far."""
    return recipe_diff.training_diff(
        config,
        plan,
        pretrained=keys.get("pretrained"),
        init_from=keys.get("init_from_checkpoint"),
        dataset=dataset_source(spec.data),
        preset=spec.preset,
        health=health.to_state() if health is not None else None,
    )


def run_training(spec: RunSpec, *, callbacks: list[Callback] | None = None) -> TrainResult:
    """Train ``spec.name`` on ``spec.data``; resumes when the work dir already holds a checkpoint."""
    dist_info: DistInfo = init_distributed(spec.device)
    folder = RunFolder(spec.work_dir)
    # one writer per run folder: rank 0 holds the lock for the run's lifetime (the other ranks write nothing)
    with folder.exclusive() if dist_info.is_main else contextlib.nullcontext():
        if dist_info.is_main:
            folder.remove_orphaned_temporaries()
        return _train(spec, dist_info, callbacks)


def _train(spec: RunSpec, dist_info: DistInfo, callbacks: list[Callback] | None) -> TrainResult:
    config = spec.config()
    check_shards_match(config, spec.data)  # another dataset's shards are an error, before anything is written
    spec.work_dir.mkdir(parents=True, exist_ok=True)
    model, keys = build_model(spec, config)
    if dist_info.is_main:
        write_json_atomic(spec.work_dir / KEY_REPORT, keys)
        write_json_atomic(spec.work_dir / CONFIG_FILE, config.to_dict())
    plan = plan_for(spec, config, dist_info.world_size, bn_spans_processes=dist_info.device.type == "cuda")
    diff = training_recipe_diff(spec, config, plan, keys)
    if dist_info.is_main:
        recipe_diff.write_diff(spec.work_dir, diff)
        recipe_diff.log_summary(diff)

    from data.loaders import build_train_loader

    pipeline = train_pipeline(config)

    def batches(start_step: int, batch_size: int, micro_batches: int) -> Iterator[Any]:
        loader = build_train_loader(
            spec.data,
            pipeline,
            batch_size=batch_size,
            seed=spec.knobs.seed,
            rank=dist_info.rank,
            world_size=dist_info.world_size,
            num_workers=spec.knobs.num_workers,
            start_step=start_step,
            micro_batches=micro_batches,
            pin_memory=dist_info.device.type == "cuda",
            skip_corrupt=spec.knobs.skip_corrupt,
        )
        return iter(loader)

    def run_eval(net: nn.Module) -> dict[str, Any]:
        result = evaluation.evaluate_model(
            net,
            config,
            spec.data,
            mode="ss",
            precision="fp32",
            dist_info=dist_info,
            batch_windows=spec.eval_batch_windows,
            limit=spec.knobs.eval_limit,
            progress=spec.progress,
            tf32=plan.tf32,
            skip_corrupt=spec.knobs.skip_corrupt,
        )
        return {**result.metrics, "per_class": result.per_class, "deform_attn_backend": result.backend}

    def current_diff(health: StepHealth) -> dict[str, Any]:
        """The recipe diff with the skips so far: in every checkpoint, and in the run folder when it changed."""
        updated = training_recipe_diff(spec, config, plan, keys, health).to_dict()
        if dist_info.is_main and updated != written[0]:
            recipe_diff.write_diff(spec.work_dir, RecipeDiff.from_dict(updated))
            written[0] = updated
        return {"recipe_diff": updated}

    written = [diff.to_dict()]

    trainer = Trainer(
        model,
        plan,
        dist_info,
        batches,
        evaluate=run_eval,
        callbacks=callbacks,
        extra_state={
            "overrides": spec.overrides,
            # a user's card: its classes and palette travel with the weights (evaluate, predict, export, serve)
            **({"dataset": get_dataset(config.data.dataset).to_record()} if is_own_data(config) else {}),
        },
        state_extras=current_diff,
    )
    try:
        return trainer.fit()
    finally:  # the skips of the last stretch (a failed run's too) are in the run folder's recipe diff
        try:
            current_diff(trainer.guard.health)
        except WriteError as err:  # a full disk: the failure that stopped training is what is raised
            log.warning("could not update the recipe diff: %s", err)
