"""``dvc.yaml`` from ``params.yaml``: one stage per dataset, run and evaluation, in the pipeline's order.

prepare_<dataset> (a dataset card's stage depends on the card and the files it names) -> weights -> train_<run> (a run that starts from another run depends on its run
folder: the two-stage chain) -> evaluate_<run> (each of its eval modes) -> report. Stage commands are
``vitadapter pipeline ...``; outputs go under ``artifacts/`` (DVC-tracked, git-ignored) and small
metrics JSON under ``metrics/`` (git-tracked: ``cache: false``). Run folders are ``persist``-ed so that
an interrupted ``dvc repro`` resumes training instead of starting over.

``vitadapter pipeline dvc-yaml --write`` regenerates the file after ``runs``/``datasets`` change;
``--check`` (and a test) keeps the committed file equal to what params.yaml implies.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from pipelines.config.knobs import weight_defining_knobs
from pipelines.config.params import TRAINING_KEYS, Params

HEADER = (
    "# Generated from params.yaml by `vitadapter pipeline dvc-yaml --write`; edit params.yaml, then regenerate.\n"
    "# prepare_<dataset> -> weights -> train_<run> (-> the runs that start from it) -> evaluate_<run> -> report\n"
)


def _metric(path: Path) -> dict[str, dict[str, bool]]:
    return {str(path): {"cache": False}}


def _present(raw: dict[str, Any], run: str, keys: tuple[str, ...]) -> list[str]:
    """``runs.<run>.<key>`` for the keys the file sets (DVC refuses to track a parameter that is absent)."""
    entry = (raw.get("runs") or {}).get(run) or {}
    return [f"runs.{run}.{key}" for key in keys if key in entry]


def _training_params(raw: dict[str, Any], run: str) -> list[str]:
    """The parameters of run ``run``'s training definition that the file sets: the entry's training keys and
    its weight-defining ``train`` knobs (:meth:`pipelines.config.params.Params.training_definition`)."""
    entry = (raw.get("runs") or {}).get(run) or {}
    train = entry.get("train") or {}
    knobs = [f"runs.{run}.train.{key}" for key in weight_defining_knobs() if key in train]
    return [*_present(raw, run, TRAINING_KEYS), *knobs]


def card_dependencies(card: str) -> list[str]:
    """What the prepare stage of a dataset card reads: the card, its folders, list files and parquet files."""
    from data.cards import FolderSplit, ListSplit, load_card

    loaded = load_card(card)
    deps = [card]
    for source in loaded.splits.values():
        if isinstance(source, FolderSplit):
            paths = [source.images, source.labels]
        elif isinstance(source, ListSplit):
            paths = [source.list, source.images, source.labels]
        else:
            paths = list(source.files)
        deps += [Path(os.path.normpath(p)).as_posix() for p in paths]
    return list(dict.fromkeys(deps))


def build_dvc_graph(
    params: Params, params_file: str = "params.yaml", raw: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The ``dvc.yaml`` document implied by ``params`` (``raw``: the YAML as written, to list only present keys)."""
    raw = (
        raw
        if raw is not None
        else {
            "runs": {
                name: {
                    **dict.fromkeys((*TRAINING_KEYS, "eval")),
                    "train": dict.fromkeys(weight_defining_knobs()),
                }
                for name in params.runs
            }
        }
    )
    stages: dict[str, Any] = {}
    metrics = Path(params.paths.metrics)
    for dataset in params.datasets:
        stage: dict[str, Any] = {
            "cmd": f"vitadapter pipeline prepare {dataset} --params {params_file}",
            "params": [{params_file: [f"datasets.{dataset}", "paths.data"]}],
            "outs": [str(params.data_dir(dataset)), str(Path(params.paths.data) / f"{dataset}_twin")]
            if params.datasets[dataset].source == "synthetic"
            else [str(params.data_dir(dataset))],
            "metrics": [_metric(metrics / "data" / f"{dataset}.json")],
        }
        card = params.datasets[dataset].card
        if params.datasets[dataset].source == "card" and card is not None:
            stage = {
                "cmd": stage["cmd"],
                "deps": card_dependencies(card),
                **{k: v for k, v in stage.items() if k != "cmd"},
            }
        stages[f"prepare_{dataset}"] = stage
    weight_keys = [k for name in params.runs for k in _training_params(raw, name)]
    stages["weights"] = {
        "cmd": f"vitadapter pipeline weights --params {params_file}",
        "params": [{params_file: [*weight_keys, "paths.weights"]}],
        "outs": [_metric(metrics / "weights.json")],  # file names and checksums: not numbers
    }
    eval_metrics: list[str] = []
    for name in params.run_order():
        run = params.runs[name]
        deps = [str(params.data_dir(run.dataset)), str(metrics / "weights.json")]
        if run.init_from in params.runs:
            deps.append(str(params.run_dir(run.init_from)))
        stages[f"train_{name}"] = {
            "cmd": f"vitadapter pipeline train {name} --params {params_file}",
            "deps": deps,
            "params": [{params_file: _training_params(raw, name)}],
            "outs": [{str(params.run_dir(name)): {"persist": True}}],
            "metrics": [_metric(params.metrics_dir(name) / "train.json")],
            "plots": [
                {
                    str(params.metrics_dir(name) / "train_curve.json"): {
                        "cache": False,
                        "x": "iteration",
                        "y": "loss",
                        "title": f"{name}: training loss",
                    }
                },
                {
                    str(params.metrics_dir(name) / "lr_curve.json"): {
                        "cache": False,
                        "x": "iteration",
                        "y": "lr",
                        "title": f"{name}: learning rate",
                    }
                },
                {
                    str(params.metrics_dir(name) / "val_curve.json"): {
                        "cache": False,
                        "x": "iteration",
                        "y": "mIoU",
                        "title": f"{name}: validation mIoU (single-scale)",
                    }
                },
            ],
        }
        # one stage evaluates every mode of the run in one process: the imports of torch, timm and mlflow and
        # the store's opening (about 10 s) once, not once a mode; each mode keeps its own outputs and fingerprint
        modes = list(run.eval.modes)
        outs = [params.metrics_dir(name) / f"eval_{mode}.json" for mode in modes]
        eval_metrics.extend(str(out) for out in outs)
        stages[f"evaluate_{name}"] = {
            "cmd": f"vitadapter pipeline evaluate {name} --mode {' '.join(modes)} --params {params_file}",
            "deps": [str(params.run_dir(name)), str(params.data_dir(run.dataset))],
            "params": [{params_file: _present(raw, name, ("eval",)) or [f"runs.{name}.config"]}],
            "outs": [str(Path(params.paths.reports) / name / f"overlays_{mode}") for mode in modes],
            "metrics": [_metric(out) for out in outs],
        }
    stages["report"] = {
        "cmd": f"vitadapter pipeline report --params {params_file}",
        "deps": eval_metrics,
        "params": [{params_file: ["tracking"]}],
        # not cached: the stage also records in MLflow (the reference rows, the report run, the UI addresses of
        # the store in use), so DVC's run cache must never restore it instead of running it
        "outs": [_metric(Path(params.paths.reports) / "report.md")],
        "metrics": [_metric(metrics / "report.json")],
    }
    return {"stages": stages}


def render_dvc_yaml(
    params: Params, params_file: str = "params.yaml", raw: dict[str, Any] | None = None
) -> str:
    return HEADER + yaml.safe_dump(build_dvc_graph(params, params_file, raw), sort_keys=False, width=120)
