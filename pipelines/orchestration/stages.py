"""The pipeline's stages, shared by ``dvc repro`` (through ``vitadapter pipeline ...``) and the Prefect flows.

prepare (per dataset) -> weights -> train (per run; a run may start from another run: the two-stage
chain) -> evaluate (per run and mode) -> report. Every stage reads ``params.yaml`` (see
:mod:`pipelines.config.params`), writes its outputs under ``paths`` and small JSON metrics under
``paths.metrics`` (git-tracked, ``dvc metrics``/``dvc plots``), and records itself in MLflow
(:mod:`pipelines.reporting.tracking`). Training with more than one GPU runs under ``torchrun`` as a
subprocess; only rank 0 reports. Which changes make a stage stale is decided by the run's training
definition (:meth:`pipelines.config.params.Params.training_definition`; see :mod:`pipelines.runs.folder`).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from data.atomic import file_sha256, write_text_atomic
from data.atomic import write_json_atomic as write_json
from pipelines.config.params import Params, ParamsError, RunParams
from pipelines.orchestration.guardian import record_failure, run_guarded, watch
from pipelines.reporting.records import FALLBACK_DB
from pipelines.reporting.report import report_markdown, report_rows
from pipelines.runs.folder import RunFolder, signature_of
from pipelines.runs.recipe_diff import folder_training_diff

if TYPE_CHECKING:
    from pipelines.runs.training import RunSpec

# torch, timm and the models (pipelines.orchestration.tracked, pipelines.runs.training and .evaluation) are
# imported by the stages that run a model, not at import: the prepare, weights and report stages (a DVC stage
# is a process of its own) start in a fraction of the time without them

log = logging.getLogger(__name__)

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
    if spec.source == "card":  # your own data: the card says where the files are and how to read the labels
        from data.prepare_card import prepare_card

        assert spec.card is not None  # parse_params requires it
        report = prepare_card(
            spec.card, out, samples_per_shard=spec.samples_per_shard, skip_unpaired=spec.skip_unpaired
        )
        raw = Path(spec.card)
    elif spec.source == "synthetic":
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
        report = prepare_dataset(dataset, raw, out, samples_per_shard=spec.samples_per_shard)
    else:
        raw = Path(spec.raw)
        report = prepare_dataset(dataset, raw, out, samples_per_shard=spec.samples_per_shard)
    index_file = out / "index.json"
    summary = {
        "dataset": dataset,
        "source": spec.source,
        "raw": str(raw),
        "index_sha256": file_sha256(index_file),
        "counts": {
            split: info["num_samples"] for split, info in json.loads(index_file.read_text())["splits"].items()
        },
        "skipped": {
            split: len(info["skipped"])
            for split, info in json.loads(index_file.read_text())["splits"].items()
        },
        "reused": report.reused,
    }
    write_record(params, f"data/{dataset}.json", summary)
    return summary


# -- weights ----------------------------------------------------------------------------------------


def weights_stage(params: Params, runs: list[str] | None = None) -> dict[str, Any]:
    """Resolve the pretrained file of every run, or of ``runs`` (present, or downloaded and hashed;
    offline: an error naming it). The results are merged into ``metrics/weights.json``."""
    from pipelines.runs.weights import resolve_weights

    summary_file = Path(params.paths.metrics) / "weights.json"
    resolved: dict[str, Any] = (
        json.loads(summary_file.read_text()) if runs is not None and summary_file.is_file() else {}
    )
    resolved = {k: v for k, v in resolved.items() if k in params.runs}
    for name in runs if runs is not None else list(params.runs):
        run = params.run(name)
        config = run.model_config()
        # a run that starts from another run or from a checkpoint file (fine-tuning) loads no pretrained trunk
        if run.init_from not in ("auto", "none") or run.train.pretrained == "none":
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


def init_from_path(params: Params, run: RunParams) -> str:
    """What ``RunSpec.init_from`` gets: the run folder of the run this one starts from (the training takes its
    final checkpoint, which follows from that run's training definition alone), or the setting as is."""
    if run.init_from not in params.runs:
        return run.init_from
    folder = params.run_dir(run.init_from)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"run {run.init_from}, which this run starts from (init_from), has no run folder {folder}: train it first"
        )
    return str(folder)


def run_spec(params: Params, name: str) -> RunSpec:
    """The :class:`pipelines.runs.training.RunSpec` of run ``name``."""
    from pipelines.runs.training import RunSpec

    run = params.run(name)
    return RunSpec(
        name=run.config,
        data=params.data_dir(run.dataset),
        work_dir=params.run_dir(name),
        knobs=run.train,
        overrides=run.model_overrides(),
        init_from=init_from_path(params, run),
        weights_dir=Path(params.paths.weights),
        runs_dir=Path(params.paths.runs),
        device="auto" if run.gpus else "cpu",
        progress=sys.stderr.isatty(),
        preset=run.preset,
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
    return [*command, *_train_stage_module(params_file, name)]


def run_signature(params: Params, name: str) -> str:
    """The hash of run ``name``'s training definition (what decides resume versus a fresh start)."""
    return signature_of(params.training_definition(name))


def stage_command(params_file: Path, name: str, run: RunParams) -> list[str]:
    """The command line that runs the train stage of ``name`` in processes of its own: ``torchrun`` for
    several GPUs or nodes, else one Python process."""
    if run.gpus > 1 or run.nodes > 1:
        return torchrun_command(params_file, name, run)
    return [sys.executable, *_train_stage_module(params_file, name)]


def _train_stage_module(params_file: Path, name: str) -> list[str]:
    """The arguments after the interpreter that run the train stage of ``name`` as a re-launched stage."""
    return ["-m", "pipelines.cli", "pipeline", "train", name, "--params", str(params_file), WORKER_FLAG]


def train_stage(
    params: Params,
    name: str,
    *,
    params_file: Path = Path("params.yaml"),
    worker: bool = False,
    isolated: bool = False,
    on_output: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train run ``name`` (resuming its run folder); multi-GPU runs re-launch this stage under torchrun.

    Args:
        params, name: the params and the run.
        params_file: the params file (what a re-launched stage reads).
        worker: this process is a re-launched stage (a torchrun rank, or the guarded child): train here.
        isolated: train in a guarded child process (:mod:`pipelines.orchestration.guardian`: the Prefect train
            task), which stops with a checkpoint when this process goes away.
        on_output: with ``isolated``, called with each line the child writes.
    """
    run = params.run(name)
    if isolated and not worker:
        command = stage_command(params_file, name, run)
        log.info("training %s in a process of its own: %s", name, " ".join(command))
        run_guarded(command, on_output=on_output)
        return read_train_summary(params, name)
    if (run.gpus > 1 or run.nodes > 1) and not worker:
        command = torchrun_command(params_file, name, run)
        log.info("launching %s", " ".join(command))
        subprocess.run(command, check=True)
        return read_train_summary(params, name)
    if not worker:
        return _train_here(params, name)
    watch()  # a re-launched stage stops with a checkpoint when the process that launched it is gone
    try:
        return _train_here(params, name)
    except BaseException as err:
        record_failure(err)  # the launching process raises it with this message
        raise


def _train_here(params: Params, name: str) -> dict[str, Any]:
    """The train stage of run ``name`` in this process (one of the ranks under torchrun)."""
    run = params.run(name)
    from pipelines.engine.distributed import barrier, init_distributed
    from pipelines.orchestration.tracked import train_tracked
    from pipelines.reporting.tracking import Tracker

    spec = run_spec(params, name)
    dist_info = init_distributed(spec.device)
    folder = RunFolder(params.run_dir(name))
    if dist_info.is_main:
        with folder.exclusive():  # never move a folder another process is training in
            folder.prepare_for(run_signature(params, name), run=name)
    barrier()
    finished = finished_training(params, name, spec)
    if finished is not None:  # a rerun of a finished run: no new MLflow run, the same metric files
        log.info("run %s is finished (%s): nothing to train", name, folder.path)
        # `dvc repro --force` deletes a stage's metric files before it runs it: put back what is missing (files
        # still there stay untouched, so a plain rerun changes nothing)
        files = ("train.json", "train_curve.json", "lr_curve.json", "val_curve.json")
        if dist_info.is_main and not all((params.metrics_dir(name) / f).is_file() for f in files):
            write_curves(params, name)
            write_record(params, f"{name}/train.json", finished)
        return finished
    tracker = (
        Tracker(params.tracking, fallback_dir=Path(params.paths.tracking_fallback))
        if dist_info.is_main
        else None
    )
    result, backend = train_tracked(
        spec,
        tracker,
        run_name=name,
        run=run,
        tags=_tags(params, name, run, stage=f"train@{name}"),
        parent=_chain_root(params, name),
        training_diff=lambda: _training_diff(params, name),
    )
    if not dist_info.is_main:
        return {}
    diff = _training_diff(params, name)
    summary = {
        "run": name,
        "config": run.config,
        "comparable_to_published": None if diff is None else diff["comparable"],
        "recipe_deviations": None if diff is None else [d["key"] for d in diff["deviations"]],
        "iterations": result.iterations,
        "best_miou": result.best_miou,
        "deform_attn_backend": backend,
        "last_checkpoint": str(result.last_checkpoint) if result.last_checkpoint else None,
        "best_checkpoint": str(result.best_checkpoint) if result.best_checkpoint else None,
        "final": dict(result.history[-1]) if result.history else {},
        "final_loss": result.history[-1].get("loss") if result.history else None,
    }
    write_curves(params, name)
    write_record(params, f"{name}/train.json", summary)
    if tracker is not None:
        tracker.log_run_files(params.run_dir(name))
    return summary


def finished_training(params: Params, name: str, spec: RunSpec) -> dict[str, Any] | None:
    """The summary of run ``name`` when its folder (of the present definition) already reached its
    iterations and the summary was written; None when there is training to do."""
    summary = read_train_summary(params, name)
    latest = RunFolder(params.run_dir(name)).latest_iteration()
    planned = spec.knobs.max_iters or spec.config().schedule.max_iters
    if not summary or latest is None or latest < planned or summary.get("iterations") != latest:
        return None
    return summary


def _training_diff(params: Params, name: str) -> dict[str, Any] | None:
    """The recipe diff the training of run ``name`` recorded in its run folder (None before training)."""
    return folder_training_diff(params.run_dir(name))


def read_train_summary(params: Params, name: str) -> dict[str, Any]:
    return read_record(params, f"{name}/train.json")


# -- metric files: numbers for DVC, the whole records beside the reports -------------------------------


def write_record(params: Params, relative: str, record: dict[str, Any]) -> None:
    """The numbers of ``record`` to ``<metrics>/<relative>`` (what ``dvc metrics`` shows: few, numeric columns),
    the whole record (names, paths, checksums) to ``<reports>/records/<relative>``."""
    numbers = {
        key: value
        for key, value in record.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }
    numbers.update(
        {
            f"{key}_{split}": count
            for key, value in record.items()
            if key == "counts" and isinstance(value, dict)
            for split, count in value.items()
        }
    )
    write_json(Path(params.paths.reports) / "records" / relative, record)
    write_json(Path(params.paths.metrics) / relative, numbers)


def read_record(params: Params, relative: str) -> dict[str, Any]:
    """The whole record :func:`write_record` wrote (empty when there is none)."""
    path = Path(params.paths.reports) / "records" / relative
    return json.loads(path.read_text()) if path.is_file() else {}


def write_curves(params: Params, name: str) -> None:
    """The training log as DVC plots: the loss and lr by iteration, and the validation mIoU by iteration."""
    records = RunFolder(params.run_dir(name)).read_log()
    losses = [{"iteration": r["iteration"], "loss": r["loss"]} for r in records if "loss" in r]
    rates = [{"iteration": r["iteration"], "lr": r["lr"]} for r in records if "lr" in r]
    write_json(params.metrics_dir(name) / "train_curve.json", losses)
    write_json(params.metrics_dir(name) / "lr_curve.json", rates)
    validation = [
        {"iteration": r["iteration"], "mIoU": r["mIoU"]}
        for r in RunFolder(params.run_dir(name)).read_eval_log()
    ]
    write_json(params.metrics_dir(name) / "val_curve.json", validation)


# -- evaluate ---------------------------------------------------------------------------------------


def evaluate_stage(params: Params, name: str, mode: str) -> dict[str, Any]:
    """Evaluate run ``name`` single- (``ss``) or multi-scale (``ms``), compare with the published number."""
    from pipelines.engine.distributed import init_distributed
    from pipelines.orchestration.tracked import data_inputs
    from pipelines.reporting.confusion import write_confusion
    from pipelines.reporting.tracking import Tracker
    from pipelines.runs import evaluation as evaluation_module
    from pipelines.runs.inputs import model_from_checkpoint

    run = params.run(name)
    if mode not in run.eval.modes:
        raise ParamsError(f"params.yaml: runs.{name}.eval.modes does not include {mode!r}")
    dist_info = init_distributed("auto" if run.gpus else "cpu")
    checkpoint = RunFolder(params.run_dir(name)).checkpoint(run.eval.checkpoint)
    reports = Path(params.paths.reports) / name
    stamp = checkpoint.stat()
    fingerprint = signature_of(
        {
            "checkpoint": [str(checkpoint), stamp.st_size, stamp.st_mtime_ns],
            "eval": asdict(run.eval),
            "mode": mode,
            "definition": params.training_definition(name),
        }
    )
    fingerprint_file = reports / f"eval_{mode}.fingerprint"
    metrics_file = params.metrics_dir(name) / f"eval_{mode}.json"
    if (
        metrics_file.is_file()
        and fingerprint_file.is_file()
        and fingerprint_file.read_text().strip() == fingerprint
    ):
        log.info(
            "run %s was evaluated (%s) with this checkpoint and these settings: nothing to do", name, mode
        )
        return read_record(params, f"{name}/eval_{mode}.json")
    model, config, _ = model_from_checkpoint(
        run.config, checkpoint, run.model_overrides(), device=dist_info.device
    )
    evaluation = evaluation_module.evaluate_model(
        model,
        config,
        params.data_dir(run.dataset),
        mode=mode,
        precision=run.eval.precision,
        dist_info=dist_info,
        batch_windows=run.eval.batch_windows,
        limit=run.eval.limit,
        progress=sys.stderr.isatty(),
        overlays_dir=reports / f"overlays_{mode}",
        tf32=run.eval.tf32,
        training_diff=_training_diff(params, name),
    )
    result = {"run": name, "checkpoint": str(checkpoint), **evaluation.summary()}
    write_record(params, f"{name}/eval_{mode}.json", result)
    write_json(reports / f"per_class_{mode}.json", evaluation.per_class)
    confusion_files = write_confusion(
        evaluation.confusion,
        evaluation.per_class["name"],
        reports / f"confusion_{mode}",
        title=f"{name}, {config.name} ({mode})",
    )
    tracker = Tracker(params.tracking, fallback_dir=Path(params.paths.tracking_fallback))
    tracker.log_evaluation(
        run_name=name,
        mode=mode,
        metrics=result,
        per_class=evaluation.per_class,
        artifacts=evaluation.artifacts,
        tags=_tags(params, name, run, stage=f"evaluate@{name}-{mode}"),
        confusion_files=confusion_files,
        inputs=data_inputs(params.data_dir(run.dataset), {"val": "evaluation"}),
    )
    write_text_atomic(fingerprint_file, fingerprint + "\n")  # after the records: a crash before re-evaluates
    return result


# -- report -----------------------------------------------------------------------------------------


def report_stage(params: Params) -> dict[str, Any]:
    """Write the comparison report and refresh the MLflow reference experiment."""
    from pipelines.reporting.tracking import Tracker

    rows = report_rows(params)
    report = Path(params.paths.reports) / "report.md"
    tracker = Tracker(params.tracking, fallback_dir=Path(params.paths.tracking_fallback))
    tracker.sync_reference_experiment()
    addresses = tracker.ui_addresses()
    text = report_markdown(rows)
    fallback = Path(params.paths.tracking_fallback) / FALLBACK_DB
    if fallback.is_file():  # tracking split between the server and the fallback store: say where
        text += (
            f"\nSome MLflow records are in the local fallback store sqlite:///{fallback.resolve()} (the tracking "
            f"server {params.tracking.uri} was unreachable): `vitadapter tracking sync` copies them over.\n"
        )
    if addresses:  # the report says where the same comparison is in the MLflow UI
        text += "\n## In the MLflow UI\n\n" + "".join(
            f"- experiment `{name}`: {hint}\n" for name, hint in addresses.items()
        )
        for name, hint in addresses.items():
            log.info("MLflow experiment %s: %s", name, hint)
    write_text_atomic(report, text)
    summary = {"rows": rows, "report": str(report)}
    write_json(Path(params.paths.reports) / "records" / "report.json", summary)
    write_json(
        Path(params.paths.metrics) / "report.json",
        {"rows": len(rows), "evaluated": sum(row["miou"] is not None for row in rows)},
    )
    tracker.log_report(report, rows)
    return summary


# -- tags -------------------------------------------------------------------------------------------


def _tags(params: Params, name: str, run: RunParams, *, stage: str) -> dict[str, str]:
    from pipelines.orchestration.tracked import run_tags

    index_sha = read_record(params, f"data/{run.dataset}.json").get("index_sha256", "")
    return run_tags(
        name, run, dataset=run.dataset, index_sha256=index_sha, stage=stage, overrides=run.overrides
    )


def _chain_root(params: Params, name: str) -> str | None:
    """The first run of the chain ``name`` belongs to (its parent in MLflow), or None for a lone run."""
    chain = params.chain_of(name)
    children = [n for n, r in params.runs.items() if r.init_from == name]
    if len(chain) == 1 and not children:
        return None
    return chain[0]
