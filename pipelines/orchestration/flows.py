"""Prefect 3 flows over the pipeline's stages: one experiment, the two-stage chain, the whole graph.

The stages (:mod:`pipelines.orchestration.stages`) are the ones ``dvc repro`` runs; here each becomes a task with
retries on transient failures (a weight download, a ``torchrun`` launch) and a persisted JSON result,
and each flow ends with a markdown and a table artifact comparing ours with the published numbers.
This is the only module of the project that imports prefect (``vitadapter flow run ...`` calls it;
``prefect.yaml`` deploys it).

Tasks take the params file's path and names, never the :class:`~pipelines.config.params.Params` object, so
their inputs travel through a deployment's parameters and their cache keys stay plain: the task,
the flow run, the params file's content and the names. A retried flow run (same flow-run id) reuses
the results of the tasks that already completed; a new flow run recomputes, and the stages themselves
reuse prepared shards and resume training from the run folder.

Results are written under ``artifacts/prefect/results`` (relative to the working directory at run
time), or under ``PREFECT_RESULTS_LOCAL_STORAGE_PATH`` / ``PREFECT_LOCAL_STORAGE_PATH`` when set.

When the orchestrator goes away (README, "Prefect"): the train task trains in a guarded process of its own
session (:mod:`pipelines.orchestration.guardian`), which a stopped worker's signals do not reach and which
stops with a checkpoint when the flow-run process is gone; a server that stops answering never stops the
stages (only their calls to it fail, after the client's retries), and :func:`run_flow` turns that failure into
one error naming the server and the recovery.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import urllib.error
from dataclasses import asdict
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import TaskRunContext
from prefect.runtime import flow_run
from prefect.settings import PREFECT_API_URL
from prefect.states import State

from pipelines.config.params import DEFAULT_PATHS, Params, ParamsError, load_params
from pipelines.orchestration import nodes, stages
from pipelines.orchestration.guardian import TrainingProcessError
from pipelines.orchestration.tracked import FLOW_RUN_ENV
from pipelines.runs.folder import signature_of
from pipelines.runs.weights import WeightsNotFoundError

DEFAULT_RESULTS_DIR = DEFAULT_PATHS.prefect_results
RESULTS_DIR_ENVS = ("PREFECT_RESULTS_LOCAL_STORAGE_PATH", "PREFECT_LOCAL_STORAGE_PATH")
RESULT_SERIALIZER = "json"

# Weight downloads: a dropped connection or a slow mirror is worth two more tries.
WEIGHTS_RETRIES = 2
WEIGHTS_RETRY_DELAYS_S = [10, 60]
# Training: a torchrun launch can fail for reasons that a new launch gets past (a rank lost with its
# node, a rendezvous timeout, a port taken). The stage resumes from the run folder's latest checkpoint,
# so a retry continues where the failed attempt stopped. A SIGTERM (a cancelled flow run, a pre-empted
# pod) is not retried: the trainer has written a checkpoint and the process is meant to stop.
TRAIN_RETRIES = 2
TRAIN_RETRY_DELAYS_S = [30, 120]
STOPPED_BY_SIGNAL = (128 + 2, 128 + 15)  # the shell's exit status after SIGINT / SIGTERM
# errors of a run's definition or data (ParamsError and OverrideError are ValueErrors): a retry fails the same way
DEFINITION_ERRORS = frozenset({"ValueError", "TypeError", "KeyError", "FileNotFoundError"})


def result_storage() -> Path:
    """Where task and flow results are persisted (a relative path resolves when a result is written)."""
    configured = next((os.environ[name] for name in RESULTS_DIR_ENVS if os.environ.get(name)), None)
    return Path(configured or DEFAULT_RESULTS_DIR)


def params_digest(params_file: str | os.PathLike[str]) -> str:
    """sha256 of the params file's bytes (empty input when it does not exist: the task reports that)."""
    path = Path(params_file)
    return hashlib.sha256(path.read_bytes() if path.is_file() else b"").hexdigest()


def stage_fingerprint(stage: str, parameters: dict[str, Any]) -> str:
    """What a stage task's result depends on: for ``train`` the run's training definition, for ``evaluate``
    that plus the run's ``eval`` settings and the mode (so an evaluation setting never invalidates a
    training task), for the other stages the params file's content."""
    params_file = parameters["params_file"]
    run = parameters.get("run")
    if stage in ("train", "evaluate") and run is not None and Path(params_file).is_file():
        params = load_params(params_file)
        fingerprint: dict[str, Any] = {
            "train": params.training_definition(run),
            "paths": asdict(params.paths),
        }
        if stage == "evaluate":
            fingerprint["eval"] = asdict(params.run(run).eval)
            fingerprint["mode"] = parameters.get("mode")
        return signature_of(fingerprint)
    return params_digest(params_file)


def stage_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """The cache key of a stage task: task, flow run, and what the stage depends on.

    Args:
        context: the task run's context (gives the task's name and its flow run).
        parameters: the task's arguments (``params_file`` and the names).

    Returns:
        A key that changes when the flow run, the stage's fingerprint (:func:`stage_fingerprint`) or any
        other argument changes.
    """
    others = {name: value for name, value in parameters.items() if name != "params_file"}
    digest = hashlib.sha256()
    digest.update(stage_fingerprint(context.task.name, parameters).encode())
    digest.update(json.dumps(others, sort_keys=True, default=str).encode())
    return f"{context.task.name}-{context.task_run.flow_run_id}-{digest.hexdigest()[:32]}"


# -- which failures are worth a retry ----------------------------------------------------------------


def is_transient_download_failure(error: BaseException) -> bool:
    """A weight download that failed on the network (not a missing URL, not a hash mismatch)."""
    cause = error.__cause__
    return isinstance(error, WeightsNotFoundError) and isinstance(
        cause, urllib.error.URLError | TimeoutError | ConnectionError
    )


def is_transient_training_failure(error: BaseException) -> bool:
    """A training failure that a new attempt (resuming from the last checkpoint) may get past.

    A training process that failed for a reason a new launch may get past: a failed ``torchrun`` launch
    (any rank's failure ends it with a non-zero status), a lost peer, a network error, the run folder still
    held by an earlier process finishing its checkpoint; not a training stopped by a signal (it wrote its
    checkpoint and is meant to stop), not one killed outright, and not an error of the run's definition or
    data (a wrong setting, a missing file).
    """
    if isinstance(error, TrainingProcessError):
        if error.signum is not None or error.returncode < 0:
            return False
        return not DEFINITION_ERRORS.intersection(error.kinds)
    if isinstance(error, subprocess.CalledProcessError):
        return error.returncode > 0 and error.returncode not in STOPPED_BY_SIGNAL
    return isinstance(error, ConnectionError | TimeoutError)


def _failure(state: State) -> BaseException | None:
    error = state.result(raise_on_failure=False)
    return error if isinstance(error, BaseException) else None


def _retry_download(task: Any, task_run: Any, state: State) -> bool:
    error = _failure(state)
    return error is not None and is_transient_download_failure(error)


def _retry_training(task: Any, task_run: Any, state: State) -> bool:
    error = _failure(state)
    return error is not None and is_transient_training_failure(error)


# -- tasks -------------------------------------------------------------------------------------------

# Flows and tasks persist their (JSON) results; tasks also reuse them within a retried flow run.
_FLOW_RESULTS: dict[str, Any] = {
    "persist_result": True,
    "result_storage": result_storage(),
    "result_serializer": RESULT_SERIALIZER,
}
_PERSISTED: dict[str, Any] = {**_FLOW_RESULTS, "cache_key_fn": stage_cache_key}


@task(name="prepare", task_run_name="prepare-{dataset}", **_PERSISTED)
def prepare_task(params_file: str, dataset: str) -> dict[str, Any]:
    """Build the shards of ``dataset`` (synthetic twin or official download)."""
    return stages.prepare_stage(load_params(params_file), dataset)


@task(
    name="weights",
    task_run_name="weights",
    retries=WEIGHTS_RETRIES,
    retry_delay_seconds=WEIGHTS_RETRY_DELAYS_S,
    retry_condition_fn=_retry_download,
    **_PERSISTED,
)
def weights_task(params_file: str, runs: list[str]) -> dict[str, Any]:
    """Resolve (find or download, then hash) the pretrained file of each of ``runs``."""
    return stages.weights_stage(load_params(params_file), runs)


@task(
    name="train",
    task_run_name=nodes.TRAIN_TASK_PREFIX + "{run}",  # the other nodes of a Kubernetes job look for it
    retries=TRAIN_RETRIES,
    retry_delay_seconds=TRAIN_RETRY_DELAYS_S,
    retry_condition_fn=_retry_training,
    **_PERSISTED,
)
def train_task(params_file: str, run: str) -> dict[str, Any]:
    """Train ``run`` in a guarded process of its own (one Python process for CPU or one GPU, ``torchrun`` for
    more): it outlives a stopped worker's signals to the flow run and then stops with a checkpoint
    (:mod:`pipelines.orchestration.guardian`); its output goes to this task's log."""
    params = load_params(params_file)
    spec = params.run(run)
    logger = get_run_logger()  # taken here: the output is forwarded from another thread
    if spec.gpus > 1 or spec.nodes > 1:
        logger.info("run %s: torchrun on %d GPU(s) x %d node(s)", run, spec.gpus, spec.nodes)
    return stages.train_stage(
        params, run, params_file=Path(params_file), isolated=True, on_output=lambda line: _relog(logger, line)
    )


# a line of the project's console log (pipelines/cli.py): time, level, logger and message
_CONSOLE_LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) (.*)$")


def _relog(logger: Any, line: str) -> None:
    """One line of the training process's output into the run's log, at the level the line names."""
    match = _CONSOLE_LINE.match(line)
    if match:
        logger.log(getattr(logging, match.group(1)), "%s", match.group(2))
    elif line.strip():
        logger.info("%s", line)


@task(name="evaluate", task_run_name="evaluate-{run}-{mode}", **_PERSISTED)
def evaluate_task(params_file: str, run: str, mode: str) -> dict[str, Any]:
    """Evaluate ``run`` single-scale (``ss``) or multi-scale + flip (``ms``)."""
    return stages.evaluate_stage(load_params(params_file), run, mode)


def artifact_key(*parts: str) -> str:
    """An artifact key (lowercase letters, digits and dashes) from free-form parts."""
    return re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")


@task(name="compare", task_run_name="compare", **_PERSISTED)
def compare_task(params_file: str, runs: list[str], key: str) -> list[dict[str, Any]]:
    """Our mIoU against the published one for ``runs``: a markdown and a table artifact named ``key``."""
    rows = [row for row in stages.report_rows(load_params(params_file)) if row["run"] in runs]
    description = f"ViT-Adapter runs {', '.join(runs)} against the published table"
    create_markdown_artifact(stages.report_markdown(rows), key=key, description=description)
    create_table_artifact(rows, key=f"{key}-table", description=description)
    return rows


@task(name="report", task_run_name="report", **_PERSISTED)
def report_task(params_file: str) -> dict[str, Any]:
    """Write the report of every run and refresh the MLflow reference experiment."""
    return stages.report_stage(load_params(params_file))


# -- flows -------------------------------------------------------------------------------------------


def _export_flow_run_id() -> None:
    """Let the stages (and torchrun's processes) tag their MLflow runs with this flow run."""
    flow_run_id = flow_run.id
    if flow_run_id:
        os.environ[FLOW_RUN_ENV] = flow_run_id


def _train_and_evaluate(params: Params, params_file: str, run: str, *, position: str = "") -> None:
    logger = get_run_logger()
    logger.info("%strain %s", position, run)
    train_task(params_file, run)
    for mode in params.run(run).eval.modes:
        logger.info("%sevaluate %s %s", position, run, mode)
        evaluate_task(params_file, run, mode)


@flow(name="stage", flow_run_name="{stage}-{run}", **_FLOW_RESULTS)
def stage_flow(
    stage: str, run: str, mode: str | None = None, params_file: str = "params.yaml"
) -> dict[str, Any]:
    """One node of the DVC graph (``dvc repro`` runs ``vitadapter pipeline train|evaluate``) as a flow run:
    the training launch gets the train task's retries, and the MLflow runs carry the flow-run id.

    Args:
        stage: ``train`` or ``evaluate``.
        run: a run under ``runs`` in the params file.
        mode: ``ss`` or ``ms`` (evaluate).
        params_file: the params file.
    """
    _export_flow_run_id()
    if stage == "train":
        return train_task(params_file, run)
    if stage == "evaluate" and mode in ("ss", "ms"):
        return evaluate_task(params_file, run, mode)
    raise ValueError(f"stage must be 'train' or 'evaluate' with mode ss|ms, got {stage!r} mode {mode!r}")


@flow(name="experiment", **_FLOW_RESULTS)
def experiment_flow(run: str, params_file: str = "params.yaml") -> list[dict[str, Any]]:
    """One run of params.yaml: prepare its dataset, weights, train, evaluate each mode, compare.

    Args:
        run: a run under ``runs`` in the params file.
        params_file: the params file (paths in it are relative to the working directory).

    Returns:
        The comparison rows (ours against the published mIoU) of ``run``.
    """
    _export_flow_run_id()
    params = load_params(params_file)
    spec = params.run(run)
    prepare_task(params_file, spec.dataset)
    weights_task(params_file, params.chain_of(run))
    _train_and_evaluate(params, params_file, run)
    return compare_task(params_file, [run], artifact_key("experiment", run))


@flow(name="two-stage", **_FLOW_RESULTS)
def two_stage_flow(run: str, params_file: str = "params.yaml") -> list[dict[str, Any]]:
    """The chain ending at ``run`` (e.g. COCO-Stuff, then ADE20K from its checkpoint), start to end.

    Prepares every dataset of the chain, resolves the first run's weights, then trains and evaluates
    each run in order (each starts from the previous run's checkpoint) and compares them all.

    Args:
        run: the last run of the chain; its ``init_from`` names the previous run.
        params_file: the params file.

    Returns:
        The comparison rows of every run of the chain.

    Raises:
        ParamsError: ``run`` does not start from another run.
    """
    _export_flow_run_id()
    params = load_params(params_file)
    chain = params.chain_of(run)
    if len(chain) < 2:
        raise ParamsError(
            f"run {run!r} does not start from another run (init_from: {params.run(run).init_from!r}): "
            "use the experiment flow"
        )
    get_run_logger().info("chain: %s", " -> ".join(chain))
    for dataset in dict.fromkeys(params.run(name).dataset for name in chain):
        prepare_task(params_file, dataset)
    weights_task(params_file, chain)
    for number, name in enumerate(chain, 1):
        _train_and_evaluate(params, params_file, name, position=f"run {number} of {len(chain)}: ")
    return compare_task(params_file, chain, artifact_key("two-stage", run))


@flow(name="pipeline", **_FLOW_RESULTS)
def pipeline_flow(params_file: str = "params.yaml") -> dict[str, Any]:
    """The whole graph of params.yaml (what ``dvc repro`` runs): every dataset and run, then the report.

    Args:
        params_file: the params file.

    Returns:
        The report's summary (its rows and the path of ``report.md``).
    """
    _export_flow_run_id()
    params = load_params(params_file)
    for dataset in params.datasets:
        prepare_task(params_file, dataset)
    order = params.run_order()
    weights_task(params_file, order)
    for number, name in enumerate(order, 1):
        _train_and_evaluate(params, params_file, name, position=f"run {number} of {len(order)}: ")
    summary = report_task(params_file)
    compare_task(params_file, order, artifact_key("pipeline"))
    return summary


FLOWS = {"experiment": experiment_flow, "two-stage": two_stage_flow, "pipeline": pipeline_flow}


# -- a server that stops answering ---------------------------------------------------------------------


class PrefectServerUnreachableError(RuntimeError):
    """The Prefect server stopped answering while a flow ran here; the message says what is kept and what to do."""


def _unreachable_cause(error: BaseException) -> BaseException | None:
    """The error (or one of its causes) that says the Prefect API did not answer: a transport error
    (refused, reset, timed out) or a server error status that outlived the client's retries."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, httpx.TransportError):
            return current
        if isinstance(current, httpx.HTTPStatusError) and current.response.status_code >= 500:
            return current
        current = current.__cause__ or current.__context__
    return None


def run_flow(name: str, function: Any = None, **parameters: Any) -> State:
    """Run flow ``name`` of :data:`FLOWS` (or ``function``, a flow) here and return its final state.

    The stages never depend on the server while they work (the training goes on when it stops answering;
    each API call is retried for about a minute by Prefect's client, so a restart in that time passes
    unnoticed). When a call finally fails, this is one error naming the server and the recovery.

    Raises:
        PrefectServerUnreachableError: the Prefect API stopped answering during the flow run.
    """
    target = function if function is not None else FLOWS[name]
    try:
        return target(**parameters, return_state=True)
    except Exception as err:
        cause = _unreachable_cause(err)
        if cause is None:
            raise
        server = PREFECT_API_URL.value() or "(the temporary local server)"
        raise PrefectServerUnreachableError(
            f"the Prefect server {server} stopped answering while flow {name} ran ({type(cause).__name__}: "
            f"{cause}); nothing the stages wrote is lost (shards, run folders with their checkpoints, metrics): "
            "when the server answers again, rerun the same command: finished stages are reused and the "
            "training resumes from its latest checkpoint"
        ) from err


# -- the other nodes of a multi-node Kubernetes job (pipelines/orchestration/nodes.py) ----------------


def observe_flow_run(flow_run_id: str) -> nodes.FlowRunView | None:
    """The flow run and its train task runs as the Prefect API reports them (None when it did not answer).

    Raises:
        prefect.exceptions.ObjectNotFound: no flow run has this id.
    """
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
        TaskRunFilterName,
    )
    from prefect.client.schemas.objects import StateType

    try:
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(UUID(flow_run_id))
            task_runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])),
                task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_=nodes.TRAIN_TASK_PREFIX)),
            )
    except (httpx.HTTPError, OSError) as error:
        logging.getLogger(__name__).warning("the Prefect API did not answer: %s", error)
        return None
    attempts = tuple(
        nodes.TrainAttempt(
            task_run_id=str(task_run.id),
            run=task_run.name.removeprefix(nodes.TRAIN_TASK_PREFIX),
            attempt=task_run.run_count,
            running=task_run.state_type == StateType.RUNNING,
        )
        for task_run in task_runs
        if task_run.name.startswith(nodes.TRAIN_TASK_PREFIX)
    )
    return nodes.FlowRunView(
        params_file=str(run.parameters.get("params_file", "params.yaml")),
        finished=run.state is not None and run.state.is_final(),
        attempts=attempts,
    )


def follow_flow_run(flow_run_id: str) -> int:
    """Join the torchrun launches of flow run ``flow_run_id`` from this node until it ends (exit status)."""
    return nodes.Follower(lambda: observe_flow_run(flow_run_id)).run()
