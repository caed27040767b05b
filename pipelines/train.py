"""One training run of a zoo entry: the one place where config, data, weights and trainer meet.

``run_training`` builds the segmentor from the zoo (plus overrides), loads the pretrained trunk
(recipes.md 2.2) and, for the strategy-2 rows, the COCO-Stuff stage checkpoint with the
class-specific layer left at its fresh initialisation, opens the prepared shards, and trains with
:class:`pipelines.engine.trainer.Trainer`, evaluating single-scale on the validation split. Rerunning
the same call resumes from the run folder's latest checkpoint. Launch it under ``torchrun`` for
several GPUs or nodes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import models
from models.checkpoint import LoadReport, load_checkpoint_file, load_stage_checkpoint
from models.config import SegmentorConfig
from models.pretrained import load_pretrained_trunk
from pipelines.engine.distributed import DevicePreference, DistInfo, init_distributed
from pipelines.engine.evaluator import InferenceSettings, evaluate
from pipelines.engine.trainer import Callback, Trainer, TrainResult, TrainSettings
from pipelines.runs import DEFAULT_RUNS_DIR, class_names, eval_items, write_json
from pipelines.specs import test_pipeline, train_pipeline
from pipelines.weights import DEFAULT_WEIGHTS_DIR, resolve_weights

log = logging.getLogger(__name__)

KEY_REPORT = "key_report.json"


@dataclass(frozen=True)
class RunSpec:
    """What to train and with which inputs.

    Attributes:
        name: zoo entry.
        data: prepared shard folder of the entry's dataset.
        overrides: zoo overrides (architecture or recipe).
        settings: run-level knobs (work dir, iterations, batch, precision, ...).
        pretrained: ``"auto"`` (the recipe's file from ``weights_dir``, downloaded if possible),
            ``"none"`` (train the trunk from its initialisation) or a file path.
        init_from: strategy-2 stage checkpoint: ``"auto"`` (for entries with a stage 1: the stage run's
            best checkpoint under ``runs_dir``, else the released file in ``weights_dir``), ``"none"``, or
            a file path (any entry: the run starts from that checkpoint, class layers re-initialised
            where their shapes differ).
        weights_dir: folder of pretrained and released files.
        runs_dir: folder of run folders (for ``init_from="auto"``).
        device: ``auto``, ``cpu`` or ``cuda``.
        num_workers: data-loader processes per rank.
        eval_limit: evaluate on the first N validation images only (quick runs).
        eval_batch_windows: sliding windows per forward at evaluation.
    """

    name: str
    data: Path
    settings: TrainSettings
    overrides: dict[str, Any] = field(default_factory=dict)
    pretrained: str = "auto"
    init_from: str = "auto"
    weights_dir: Path = DEFAULT_WEIGHTS_DIR
    runs_dir: Path = DEFAULT_RUNS_DIR
    device: DevicePreference = "auto"
    num_workers: int = 2
    eval_limit: int | None = None
    eval_batch_windows: int = 4


def default_work_dir(name: str, runs_dir: Path = DEFAULT_RUNS_DIR) -> Path:
    return runs_dir / name


def _load_pretrained(model: nn.Module, config: SegmentorConfig, spec: RunSpec) -> dict[str, Any] | None:
    if spec.pretrained == "none":
        log.warning(
            "no pretrained trunk: %s starts from its initialisation (not the reference recipe)", config.name
        )
        return None
    recipe = config.pretrained
    path, digest = resolve_weights(
        recipe.file,
        recipe.url,
        weights_dir=spec.weights_dir,
        path=None if spec.pretrained == "auto" else spec.pretrained,
    )
    report, resized = load_pretrained_trunk(
        model.backbone, load_checkpoint_file(path), config.backbone.trunk.kind, source=str(path)
    )
    return {"file": str(path), "sha256": digest, "resized": resized, **report.to_dict()}


def stage_checkpoint_path(config: SegmentorConfig, spec: RunSpec) -> Path | None:
    """The checkpoint a strategy-2 run starts from, or None when the entry has no stage 1."""
    recipe = config.pretrained
    if spec.init_from not in ("auto", "none"):
        return Path(spec.init_from)  # an explicit checkpoint, also for entries without a stage 1
    if recipe.init_from is None or spec.init_from == "none":
        return None
    candidates = [spec.runs_dir / recipe.init_from / "best_mIoU.pth"]
    latest = spec.runs_dir / recipe.init_from
    if latest.is_dir():
        candidates += sorted(latest.glob("iter_*.pth"), reverse=True)
    if recipe.init_from_file:
        candidates.append(spec.weights_dir / recipe.init_from_file)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{config.name} starts from the {recipe.init_from} stage (recipes.md 2.2): train that stage first "
        f"(its run folder {spec.runs_dir / recipe.init_from}) or download {recipe.init_from_url} (unzip it) "
        f"to {spec.weights_dir / (recipe.init_from_file or '')}; or pass init_from='none'"
    )


def load_stage(model: nn.Module, path: Path) -> LoadReport:
    """Strategy-2 hand-off (recipes.md 2.2): every tensor whose name and shape match is copied; the
    class-specific layers (shapes differ) get PyTorch's default initialisation; optimizer state and
    iteration are not carried (the new run starts its schedule at 0)."""
    return load_stage_checkpoint(model, load_checkpoint_file(path), source=str(path))


def build_model(spec: RunSpec, config: SegmentorConfig) -> tuple[nn.Module, dict[str, Any]]:
    """The initialised model and the key report of what was loaded into it."""
    torch.manual_seed(spec.settings.seed)
    model = models.build_segmentor(config)
    keys: dict[str, Any] = {"config": config.name, "overrides": spec.overrides}
    stage = stage_checkpoint_path(config, spec)
    if stage is not None:
        report = load_stage(model, stage)
        keys["init_from"] = report.to_dict()
        log.info("initialised from %s; re-initialised: %s", stage, [k for k, _, _ in report.mismatched])
    else:
        keys["pretrained"] = _load_pretrained(model, config, spec)
    return model, keys


def run_training(spec: RunSpec, *, callbacks: list[Callback] | None = None) -> TrainResult:
    """Train ``spec.name`` on ``spec.data``; resumes when the work dir already holds a checkpoint."""
    dist_info: DistInfo = init_distributed(spec.device)
    config = models.get_config(spec.name, **spec.overrides)
    work_dir = spec.settings.work_dir
    work_dir.mkdir(parents=True, exist_ok=True)
    model, keys = build_model(spec, config)
    if dist_info.is_main:
        write_json(work_dir / KEY_REPORT, keys)
        write_json(work_dir / "config.json", config.to_dict())

    from data.loaders import build_train_loader

    pipeline = train_pipeline(config)

    def batches(start_step: int, batch_size: int, micro_batches: int) -> Iterator[Any]:
        loader = build_train_loader(
            spec.data,
            pipeline,
            batch_size=batch_size,
            seed=spec.settings.seed,
            rank=dist_info.rank,
            world_size=dist_info.world_size,
            num_workers=spec.num_workers,
            start_step=start_step,
            micro_batches=micro_batches,
            pin_memory=dist_info.device.type == "cuda",
        )
        return iter(loader)

    eval_pipeline = test_pipeline(config, "ss")
    inference = InferenceSettings.from_config(config, batch_windows=spec.eval_batch_windows)
    names = class_names(config)

    def run_eval(net: nn.Module) -> dict[str, Any]:
        source = eval_items(
            config, spec.data, rank=dist_info.rank, world_size=dist_info.world_size, limit=spec.eval_limit
        )
        return evaluate(
            net,
            source.items,
            eval_pipeline,
            inference,
            num_classes=config.num_classes,
            device=dist_info.device,
            class_names=names,
            total=source.total,
            progress=spec.settings.progress and dist_info.is_main,
            distributed=dist_info.distributed,
        )

    trainer = Trainer(
        model,
        config,
        spec.settings,
        dist_info,
        batches,
        evaluate=run_eval,
        callbacks=callbacks,
        extra_state={"overrides": spec.overrides},
    )
    return trainer.fit()
