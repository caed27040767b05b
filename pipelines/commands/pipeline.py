"""``vitadapter pipeline``: the stages of the reproducible graph (what ``dvc.yaml`` runs), one per command."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from pipelines.config.params import DEFAULT_PATHS

log = logging.getLogger(__name__)


PREFECT_OPTION = {
    "choices": ("auto", "always", "never"),
    "default": "auto",
    "help": "run the stage as a Prefect flow run: auto (default) when a Prefect server is configured "
    "(PREFECT_API_URL, or `prefect config set PREFECT_API_URL=...`), always (a temporary local server "
    "without one), never",
}


def _params(args: argparse.Namespace):
    from pipelines.config.params import load_params

    return load_params(args.params)


def _print(result: object) -> int:
    json.dump(result, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from pipelines.orchestration.stages import prepare_stage

    return _print(prepare_stage(_params(args), args.dataset))


def _weights(args: argparse.Namespace) -> int:
    from pipelines.orchestration.stages import weights_stage

    return _print(weights_stage(_params(args)))


def _as_flow_run(args: argparse.Namespace) -> bool:
    """``--prefect auto``: a flow run when a Prefect server is configured, the stage itself otherwise."""
    if args.prefect != "auto":
        return args.prefect == "always"
    from pipelines.commands.flow import prefect_server_configured

    return prefect_server_configured()


def _train(args: argparse.Namespace) -> int:
    from pipelines.orchestration.stages import train_stage

    params = _params(args)
    params.run(args.run)  # an unknown run fails here, before any flow starts
    if args.worker or not _as_flow_run(args):  # torchrun's processes run the stage itself
        result = train_stage(params, args.run, params_file=Path(args.params), worker=args.worker)
    else:
        from pipelines.commands.flow import run_stage_flow

        result = run_stage_flow("train", args.run, params_file=args.params)
    return _print(result) if result else 0


def _evaluate(args: argparse.Namespace) -> int:
    from pipelines.orchestration.stages import evaluate_stage

    params = _params(args)
    params.run(args.run)
    modes = list(dict.fromkeys(args.mode))  # in the given order, each once
    as_flow_run = _as_flow_run(args)
    if as_flow_run:
        from pipelines.commands.flow import run_stage_flow
    results: dict[str, Any] = {}
    for mode in modes:  # one after the other: a failure stops the stage, the modes finished before it stay
        if as_flow_run:
            results[mode] = run_stage_flow("evaluate", args.run, mode=mode, params_file=args.params)
        else:
            results[mode] = evaluate_stage(params, args.run, mode)
    return _print(results[modes[0]] if len(modes) == 1 else results)


def _report(args: argparse.Namespace) -> int:
    from pipelines.orchestration.stages import report_stage

    summary = report_stage(_params(args))
    sys.stdout.write(Path(summary["report"]).read_text())
    log.info("report: %s", summary["report"])
    return 0


def _plots(args: argparse.Namespace) -> int:
    from pipelines.reporting.plots import show_plots

    page = show_plots(Path(args.out), template=Path(args.template))
    log.info("training curves: %s (self-contained, renders offline)", page)
    return 0


def _dvc_yaml(args: argparse.Namespace) -> int:
    import yaml

    from pipelines.orchestration.dvcgraph import render_dvc_yaml

    text = render_dvc_yaml(_params(args), args.params, yaml.safe_load(Path(args.params).read_text()))
    target = Path(args.dvc_file)
    if args.check:
        current = target.read_text() if target.is_file() else ""
        if current != text:
            log.error(
                "%s is not what %s implies: run `vitadapter pipeline dvc-yaml --write`", target, args.params
            )
            return 1
        return 0
    if args.write:
        from data.atomic import write_text_atomic

        write_text_atomic(target, text)
        log.info("wrote %s", target)
        return 0
    sys.stdout.write(text)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pipeline",
        help="the pipeline's stages (what dvc repro runs) and dvc.yaml generation",
        description=(
            "Stages of the reproducible graph, driven by params.yaml: prepare DATASET -> weights -> train RUN -> "
            "evaluate RUN --mode ss [ms] -> report. `dvc repro` runs them in order; each can also be run by hand. "
            "train and evaluate run as Prefect flow runs (on Prefect's temporary local server unless "
            "PREFECT_API_URL names a server)."
        ),
    )
    actions = parser.add_subparsers(dest="action", metavar="STAGE", required=True)

    def add(name: str, func, text: str) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=text, description=text)
        sub.add_argument("--params", default="params.yaml", help="params file (default params.yaml)")
        sub.set_defaults(func=func)
        return sub

    add(
        "prepare", _prepare, "build the shards of a dataset (synthetic twin or official download)"
    ).add_argument("dataset", help="a dataset listed under datasets in params.yaml")
    add("weights", _weights, "resolve (download, hash) the pretrained file of every run")
    train = add("train", _train, "train a run of params.yaml (resumes its run folder; torchrun for gpus > 1)")
    train.add_argument("run", help="a run listed under runs in params.yaml")
    train.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    train.add_argument("--prefect", **PREFECT_OPTION)
    evaluate = add("evaluate", _evaluate, "evaluate a trained run and compare with its published number")
    evaluate.add_argument("run", help="a run listed under runs in params.yaml")
    evaluate.add_argument(
        "--mode",
        choices=("ss", "ms"),
        nargs="+",
        required=True,
        help="single-scale and/or multi-scale + flip, evaluated in this order in one process (the dvc.yaml stage "
        "gives all of the run's eval.modes); prints the result, or one result per mode for several",
    )
    evaluate.add_argument("--prefect", **PREFECT_OPTION)
    add("report", _report, "write the comparison report and refresh the MLflow reference experiment")
    plots = add("plots", _plots, "dvc plots show with vega inlined, so the page renders offline")
    plots.add_argument(
        "--out", default=DEFAULT_PATHS.plots, help=f"output folder (default {DEFAULT_PATHS.plots})"
    )
    plots.add_argument(
        "--template",
        default=f"{DEFAULT_PATHS.plots}/offline_template.html",
        help="the offline template (built once with npm if missing)",
    )
    graph = add("dvc-yaml", _dvc_yaml, "print, write or check the dvc.yaml that params.yaml implies")
    graph.add_argument("--dvc-file", default="dvc.yaml", help="the dvc.yaml to write or check")
    mode = graph.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="write it")
    mode.add_argument("--check", action="store_true", help="exit 1 if the file differs")
