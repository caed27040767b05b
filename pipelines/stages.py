"""The pipeline's stages, shared by ``dvc repro`` (through ``vitadapter pipeline ...``) and the Prefect flows.

prepare (per dataset) -> weights -> train (per run; a run may start from another run: the two-stage
chain) -> evaluate (per run and mode) -> report. Every stage reads ``params.yaml`` (see
:mod:`pipelines.params`), writes its outputs under ``paths`` and small JSON metrics under
``paths.metrics`` (git-tracked, ``dvc metrics``/``dvc plots``), and records itself in MLflow
(:mod:`pipelines.tracking`). Training with more than one GPU runs under ``torchrun`` as a
subprocess; only rank 0 reports.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import models
from pipelines.params import Params, ParamsError, RunParams
from pipelines.runs import write_json

log = logging.getLogger(__name__)

STAGE_ENV = "VITADAPTER_STAGE"
FLOW_RUN_ENV = "VITADAPTER_FLOW_RUN_ID"
WORKER_FLAG = "--worker"


# -- prepare ----------------------------------------------------------------------------------------


def prepare_stage(params: Params, dataset: str) -> dict[str, Any]:
    """Build the shards of ``dataset`` (from its synthetic twin or the official download)."""
    from data.prepare import prepare_dataset
    from data.synthetic import synthesize

    if dataset not in params.datasets:
        raise ParamsError(f"params.yaml: datasets does not list {dataset!r}")
    spec = params.datasets[dataset]
    out = params.data_dir(dataset)
    if spec.source == "synthetic":
        twin = synthesize(
            dataset,
            Path(params.paths.data) / f"{dataset}_twin",
            num_train=spec.num_train,
            num_val=spec.num_val,
            seed=spec.seed,
            min_size=spec.min_size,
            max_size=spec.max_size,
            num_classes_used=spec.num_classes_used,
        )
        raw = twin.root
    else:
        raw = Path(spec.raw)
    report = prepare_dataset(dataset, raw, out, samples_per_shard=spec.samples_per_shard)
    index_file = out / "index.json"
    summary = {
        "dataset": dataset,
        "source": spec.source,
        "raw": str(raw),
        "index_sha256": hashlib.sha256(index_file.read_bytes()).hexdigest(),
        "counts": {
            split: info["num_samples"] for split, info in json.loads(index_file.read_text())["splits"].items()
        },
        "reused": report.reused,
    }
    write_json(Path(params.paths.metrics) / "data" / f"{dataset}.json", summary)
    return summary


# -- weights ----------------------------------------------------------------------------------------


def weights_stage(params: Params, runs: list[str] | None = None) -> dict[str, Any]:
    """Resolve the pretrained file of every run, or of ``runs`` (present, or downloaded and hashed;
    offline: an error naming it). The results are merged into ``metrics/weights.json``."""
    from pipelines.weights import resolve_weights

    summary_file = Path(params.paths.metrics) / "weights.json"
    resolved: dict[str, Any] = (
        json.loads(summary_file.read_text()) if runs is not None and summary_file.is_file() else {}
    )
    resolved = {k: v for k, v in resolved.items() if k in params.runs}
    for name in runs if runs is not None else list(params.runs):
        run = params.run(name)
        config = models.get_config(run.config, **run.overrides)
        if _initialised_from_run(params, run) or run.train.pretrained == "none":
            resolved[name] = {"pretrained": None}
            continue
        path, digest = resolve_weights(
            config.pretrained.file,
            config.pretrained.url,
            weights_dir=params.paths.weights,
            path=None if run.train.pretrained == "auto" else run.train.pretrained,
        )
        resolved[name] = {"pretrained": str(path), "sha256": digest}
    write_json(summary_file, dict(sorted(resolved.items())))
    return resolved


# -- train ------------------------------------------------------------------------------------------


def _initialised_from_run(params: Params, run: RunParams) -> bool:
    return run.init_from in params.runs


def init_from_path(params: Params, run: RunParams) -> str:
    """What ``RunSpec.init_from`` gets: a previous run's best (else last) checkpoint, or the setting as is."""
    if not _initialised_from_run(params, run):
        return run.init_from
    folder = params.run_dir(run.init_from)
    best = folder / "best_mIoU.pth"
    if best.is_file():
        return str(best)
    last = sorted(folder.glob("iter_*.pth"))
    if not last:
        raise FileNotFoundError(f"run {run.init_from!r} has no checkpoint in {folder}: train it first")
    return str(last[-1])


def run_spec(params: Params, name: str):
    """The :class:`pipelines.train.RunSpec` of run ``name``."""
    from pipelines.engine.trainer import TrainSettings
    from pipelines.train import RunSpec

    run = params.run(name)
    knobs = run.train
    settings = TrainSettings(
        work_dir=params.run_dir(name),
        max_iters=knobs.max_iters,
        batch_size=knobs.batch_size,
        global_batch=knobs.global_batch,
        precision=knobs.precision,
        eval_interval=knobs.eval_interval,
        checkpoint_interval=knobs.checkpoint_interval,
        log_interval=knobs.log_interval,
        keep_checkpoints=knobs.keep_checkpoints,
        seed=knobs.seed,
        deterministic=knobs.deterministic,
        progress=sys.stderr.isatty(),
    )
    return RunSpec(
        name=run.config,
        data=params.data_dir(run.dataset),
        settings=settings,
        overrides=run.overrides,
        pretrained=knobs.pretrained,
        init_from=init_from_path(params, run),
        weights_dir=Path(params.paths.weights),
        runs_dir=Path(params.paths.runs),
        device="auto" if run.gpus else "cpu",
        num_workers=knobs.num_workers,
        eval_limit=knobs.eval_limit,
    )


def torchrun_command(params_file: Path, name: str, run: RunParams) -> list[str]:
    """The ``torchrun`` command line of a multi-GPU (or multi-node) run."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={max(run.gpus, 1)}"]
    if run.nodes == 1:
        command.append("--standalone")  # a private rendezvous on a free port (concurrent runs do not clash)
    else:
        command += [
            f"--nnodes={run.nodes}",
            f"--node-rank={os.environ.get('NODE_RANK', '0')}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={os.environ.get('MASTER_ADDR', '127.0.0.1')}:{os.environ.get('MASTER_PORT', '29500')}",
        ]
    return [
        *command,
        "-m",
        "pipelines.cli",
        "pipeline",
        "train",
        name,
        "--params",
        str(params_file),
        WORKER_FLAG,
    ]


def train_stage(
    params: Params, name: str, *, params_file: Path = Path("params.yaml"), worker: bool = False
) -> dict[str, Any]:
    """Train run ``name`` (resuming its run folder); multi-GPU runs re-launch this stage under torchrun."""
    run = params.run(name)
    if (run.gpus > 1 or run.nodes > 1) and not worker:
        command = torchrun_command(params_file, name, run)
        log.info("launching %s", " ".join(command))
        subprocess.run(command, check=True)
        return read_train_summary(params, name)
    from pipelines.engine.distributed import init_distributed
    from pipelines.tracking import Tracker, TrainingCallback
    from pipelines.train import run_training

    spec = run_spec(params, name)
    dist_info = init_distributed(spec.device)
    if dist_info.is_main:
        reset_if_changed(params, name)
    from pipelines.engine.distributed import barrier

    barrier()
    tracker = (
        Tracker(params.tracking, fallback_dir=Path(params.paths.tracking_fallback))
        if dist_info.is_main
        else None
    )
    callbacks = []
    if tracker is not None:
        config = models.get_config(run.config, **run.overrides)
        tracker.start_training_run(
            run_name=name,
            config=config,
            run_params=run,
            tags=_tags(params, name, run, stage=f"train@{name}"),
            parent=_chain_root(params, name),
        )
        callbacks.append(TrainingCallback(tracker))
    try:
        result = run_training(spec, callbacks=callbacks)
    except BaseException:
        if tracker is not None:
            tracker.end_run("FAILED")
        raise
    if tracker is not None:
        tracker.end_run()
    if not dist_info.is_main:
        return {}
    summary = {
        "run": name,
        "config": run.config,
        "iterations": result.iterations,
        "best_miou": result.best_miou,
        "last_checkpoint": str(result.last_checkpoint) if result.last_checkpoint else None,
        "best_checkpoint": str(result.best_checkpoint) if result.best_checkpoint else None,
        "final": {k: v for k, v in (result.history[-1].items() if result.history else [])},
    }
    _write_curve(params, name)
    write_json(params.metrics_dir(name) / "train.json", summary)
    if tracker is not None:
        tracker.log_run_files(params.run_dir(name))
    return summary


SIGNATURE_FILE = "run_signature.json"
# the keys of a run entry that define its training (``eval`` only changes the evaluation)
TRAINING_KEYS = ("config", "overrides", "init_from", "train", "gpus", "nodes")


def run_signature(params: Params, name: str) -> str:
    """Hash of everything that defines run ``name`` (its params entry and the run it starts from)."""
    run = params.run(name)
    payload = {
        "run": asdict(run),
        "init_from": init_from_path(params, run) if _initialised_from_run(params, run) else None,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def reset_if_changed(params: Params, name: str) -> None:
    """Resume only a run of the same definition: a run folder written for other params is cleared."""
    folder = params.run_dir(name)
    signature = run_signature(params, name)
    marker = folder / SIGNATURE_FILE
    if folder.is_dir() and any(folder.iterdir()):
        recorded = json.loads(marker.read_text()).get("signature") if marker.is_file() else None
        if recorded != signature:
            log.warning(
                "params of run %s changed since %s was written: starting the run afresh", name, folder
            )
            shutil.rmtree(folder)
    write_json(marker, {"signature": signature})


def read_train_summary(params: Params, name: str) -> dict[str, Any]:
    path = params.metrics_dir(name) / "train.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_curve(params: Params, name: str) -> None:
    """The training log as a DVC plot (a JSON list of records)."""
    log_file = params.run_dir(name) / "train_log.jsonl"
    records = (
        [json.loads(line) for line in log_file.read_text().splitlines() if line] if log_file.is_file() else []
    )
    write_json(params.metrics_dir(name) / "train_curve.json", records)


# -- evaluate ---------------------------------------------------------------------------------------


def checkpoint_for_eval(params: Params, name: str) -> Path:
    run = params.run(name)
    folder = params.run_dir(name)
    best = folder / "best_mIoU.pth"
    if run.eval.checkpoint == "best" and best.is_file():
        return best
    last = sorted(folder.glob("iter_*.pth"))
    if not last:
        raise FileNotFoundError(f"run {name!r} has no checkpoint in {folder}: train it first")
    return last[-1]


def evaluate_stage(params: Params, name: str, mode: str) -> dict[str, Any]:
    """Evaluate run ``name`` single- (``ss``) or multi-scale (``ms``), compare with the published number."""
    from pipelines.engine.distributed import init_distributed
    from pipelines.engine.evaluator import InferenceSettings, evaluate, resolve_precision
    from pipelines.runs import class_names, eval_items, model_from_checkpoint
    from pipelines.specs import test_pipeline
    from pipelines.tracking import Tracker

    run = params.run(name)
    if mode not in run.eval.modes:
        raise ParamsError(f"params.yaml: runs.{name}.eval.modes does not include {mode!r}")
    dist_info = init_distributed("auto" if run.gpus else "cpu")
    checkpoint = checkpoint_for_eval(params, name)
    model, config, _ = model_from_checkpoint(run.config, checkpoint, run.overrides, device=dist_info.device)
    source = eval_items(config, params.data_dir(run.dataset), limit=run.eval.limit)
    settings = InferenceSettings.from_config(
        config,
        batch_windows=run.eval.batch_windows,
        precision=resolve_precision(config, run.eval.precision, dist_info.device),
    )
    metrics = evaluate(
        model,
        source.items,
        test_pipeline(config, mode),
        settings,
        num_classes=config.num_classes,
        device=dist_info.device,
        class_names=class_names(config),
        total=source.total,
        progress=sys.stderr.isatty(),
    )
    published = config.published.miou_ss if mode == "ss" else config.published.miou_ms
    result = {
        "run": name,
        "config": run.config,
        "mode": mode,
        "checkpoint": str(checkpoint),
        "published_miou": published,
        "delta_miou": None if published is None else metrics["mIoU"] - published,
        **{k: v for k, v in metrics.items() if k != "per_class"},
    }
    out = params.metrics_dir(name)
    write_json(out / f"eval_{mode}.json", result)
    reports = Path(params.paths.reports) / name
    write_json(reports / f"per_class_{mode}.json", metrics["per_class"])
    overlays = sample_overlays(
        model, config, params.data_dir(run.dataset), reports / f"overlays_{mode}", mode, settings
    )
    tracker = Tracker(params.tracking, fallback_dir=Path(params.paths.tracking_fallback))
    tracker.log_evaluation(
        run_name=name,
        mode=mode,
        metrics=result,
        per_class=metrics["per_class"],
        artifacts=overlays,
        tags=_tags(params, name, run, stage=f"evaluate@{name}-{mode}"),
    )
    return result


NUM_OVERLAYS = 2


def sample_overlays(model, config, data: Path, out: Path, mode: str, settings) -> list[Path]:
    """Colour overlays of the first validation images (for the MLflow run)."""
    import cv2

    from pipelines.engine.evaluator import predict_probabilities
    from pipelines.runs import class_names, eval_items, palette
    from pipelines.specs import test_pipeline
    from pipelines.visualize import overlay_with_legend

    out.mkdir(parents=True, exist_ok=True)
    pipeline = test_pipeline(config, mode)
    device = next(model.parameters()).device
    paths = []
    for item in eval_items(config, data, limit=NUM_OVERLAYS).items:
        probs = predict_probabilities(
            model, item["image"], pipeline, settings, num_classes=config.num_classes, device=device
        )
        pred = probs.argmax(dim=0).numpy()
        path = out / f"{item['key']}.png"
        cv2.imwrite(str(path), overlay_with_legend(item["image"], pred, palette(config), class_names(config)))
        paths.append(path)
    return paths


# -- report -----------------------------------------------------------------------------------------


def report_rows(params: Params) -> list[dict[str, Any]]:
    """One row per evaluated run and mode: ours against the published number."""
    rows = []
    for name, run in params.runs.items():
        config = models.get_config(run.config)
        for mode in run.eval.modes:
            path = params.metrics_dir(name) / f"eval_{mode}.json"
            ours = json.loads(path.read_text()) if path.is_file() else None
            rows.append(
                {
                    "run": name,
                    "config": run.config,
                    "dataset": config.data.dataset,
                    "mode": mode,
                    "miou": None if ours is None else ours["mIoU"],
                    "published_miou": config.published.miou_ss if mode == "ss" else config.published.miou_ms,
                    "delta_miou": None if ours is None else ours["delta_miou"],
                    "params_published_m": config.published.params_m,
                    "overrides": bool(run.overrides),
                }
            )
    return rows


def report_markdown(rows: list[dict[str, Any]]) -> str:
    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    lines = [
        "# ViT-Adapter runs against the published table",
        "",
        "| run | zoo entry | mode | mIoU (ours) | mIoU (published) | delta | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        note = "modified config (overrides): not comparable" if row["overrides"] else ""
        lines.append(
            f"| {row['run']} | {row['config']} | {row['mode'].upper()} | {fmt(row['miou'])} | "
            f"{fmt(row['published_miou'])} | {fmt(row['delta_miou'])} | {note} |"
        )
    return "\n".join(lines) + "\n"


def report_stage(params: Params) -> dict[str, Any]:
    """Write the comparison report and refresh the MLflow reference experiment."""
    from pipelines.tracking import Tracker

    rows = report_rows(params)
    report = Path(params.paths.reports) / "report.md"
    report.parent.mkdir(parents=True, exist_ok=True)
    from pipelines.engine.checkpoints import write_text_atomic

    write_text_atomic(report, report_markdown(rows))
    summary = {"rows": rows, "report": str(report)}
    write_json(Path(params.paths.metrics) / "report.json", summary)
    tracker = Tracker(params.tracking, fallback_dir=Path(params.paths.tracking_fallback))
    tracker.sync_reference_experiment()
    tracker.log_report(report, rows)
    return summary


# -- tags -------------------------------------------------------------------------------------------


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _tags(params: Params, name: str, run: RunParams, *, stage: str) -> dict[str, str]:
    data_summary = Path(params.paths.metrics) / "data" / f"{run.dataset}.json"
    index_sha = json.loads(data_summary.read_text())["index_sha256"] if data_summary.is_file() else ""
    tags = {
        "vitadapter.run": name,
        "vitadapter.zoo_entry": run.config,
        "vitadapter.dataset": run.dataset,
        "vitadapter.data_index_sha256": index_sha,
        "vitadapter.dvc_stage": os.environ.get(STAGE_ENV, stage),
        "vitadapter.overrides": json.dumps(run.overrides, sort_keys=True),
        "vitadapter.params": json.dumps(asdict(run.train), sort_keys=True),
    }
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    flow_run = os.environ.get(FLOW_RUN_ENV)
    if flow_run:
        tags["vitadapter.prefect_flow_run_id"] = flow_run
    return tags


def _chain_root(params: Params, name: str) -> str | None:
    """The first run of the chain ``name`` belongs to (its parent in MLflow), or None for a lone run."""
    chain = [name]
    while params.runs[chain[-1]].init_from in params.runs:
        chain.append(params.runs[chain[-1]].init_from)
    children = [n for n, r in params.runs.items() if r.init_from == name]
    if len(chain) == 1 and not children:
        return None
    return chain[-1]
