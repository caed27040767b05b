"""``vitadapter flow run experiment|two-stage|pipeline``: the Prefect flows of :mod:`pipelines.orchestration.flows`;
``vitadapter flow node -- COMMAND``: a pod of the Kubernetes work pool's job (:mod:`pipelines.orchestration.nodes`).

With ``PREFECT_API_URL`` set (or a Prefect profile that sets it) the flow run is recorded on that
server; otherwise Prefect starts a temporary local server for the run, whose state lives under
``PREFECT_HOME`` (``artifacts/prefect-home`` unless set). The command exits 1 when the flow run does
not complete, and with one line naming the server when a configured Prefect server stopped answering
(the stages' outputs are kept: rerunning the command resumes).
"""

from __future__ import annotations

import argparse
import logging
import os
import tomllib
from collections.abc import Mapping, MutableMapping
from pathlib import Path

from pipelines.config.params import DEFAULT_PATHS

log = logging.getLogger(__name__)

DEFAULT_PREFECT_HOME = Path(DEFAULT_PATHS.prefect_home)
DEFAULT_PROFILES_FILE = Path("~/.prefect/profiles.toml")
# Prefect's default (20 s) is short for a first start on a busy 2-core machine (database migrations).
STARTUP_TIMEOUT_S = "90"


def _profile_sets_api_url(profiles_file: Path) -> bool:
    """Whether the active profile of a Prefect profiles file names a server."""
    try:
        data = tomllib.loads(profiles_file.expanduser().read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return False
    active = data.get("active", "ephemeral")
    return bool(data.get("profiles", {}).get(active, {}).get("PREFECT_API_URL"))


def prefect_server_configured(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether a Prefect server is configured: ``PREFECT_API_URL`` in the environment or in the active profile
    (``PREFECT_PROFILES_PATH``, else ``$PREFECT_HOME/profiles.toml``, else ``~/.prefect/profiles.toml``)."""
    if environ.get("PREFECT_API_URL"):
        return True
    if environ.get("PREFECT_PROFILES_PATH"):
        return _profile_sets_api_url(Path(environ["PREFECT_PROFILES_PATH"]))
    if environ.get("PREFECT_HOME"):
        return _profile_sets_api_url(Path(environ["PREFECT_HOME"]) / "profiles.toml")
    return _profile_sets_api_url(DEFAULT_PROFILES_FILE)


def configure_prefect_environment(environ: MutableMapping[str, str] = os.environ) -> Path | None:
    """Environment for Prefect, set before prefect is imported.

    Analytics off and a longer start-up timeout for the temporary server. Without a configured server
    (``PREFECT_API_URL``, or a profile that sets it), ``PREFECT_HOME`` defaults to
    ``artifacts/prefect-home`` so the temporary server's database and logs stay with the project.
    ``PREFECT_HOME`` is created: Prefect's temporary server dies when its folder is missing.

    Args:
        environ: the environment to change (the process's by default).

    Returns:
        The ``PREFECT_HOME`` that was set or created, or None when a server is configured and
        ``PREFECT_HOME`` was not set.
    """
    environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # the project's log lines (training progress, evaluation) appear in the flow-run logs too
    environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "pipelines,models,data")
    environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", STARTUP_TIMEOUT_S)
    home = environ.get("PREFECT_HOME")
    if not home:
        profiles = Path(environ.get("PREFECT_PROFILES_PATH") or DEFAULT_PROFILES_FILE)
        if environ.get("PREFECT_API_URL") or _profile_sets_api_url(profiles):
            return None
        home = str(DEFAULT_PREFECT_HOME.resolve())
        environ["PREFECT_HOME"] = home
    path = Path(home).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_stage_flow(stage: str, run: str, *, params_file: str, mode: str | None = None) -> dict:
    """Run one pipeline stage as a Prefect flow run (temporary local server without PREFECT_API_URL).

    Raises:
        RuntimeError: the flow run did not complete, naming it and its state message, or the Prefect server
            stopped answering (:class:`pipelines.orchestration.flows.PrefectServerUnreachableError`).
    """
    configure_prefect_environment()
    logging.getLogger("httpx").setLevel(logging.WARNING)
    from pipelines.orchestration.flows import run_flow, stage_flow

    state = run_flow(
        f"stage {stage} {run}", stage_flow, stage=stage, run=run, mode=mode, params_file=params_file
    )
    if not state.is_completed():
        raise RuntimeError(
            f"stage {stage} {run} (flow run {state.state_details.flow_run_id}) ended {state.name}: {state.message}"
        )
    return state.result()


def _run(args: argparse.Namespace) -> int:
    configure_prefect_environment()
    if args.verbose < 2:  # httpx logs every call to the Prefect API at INFO
        logging.getLogger("httpx").setLevel(logging.WARNING)
    from pipelines.orchestration.flows import run_flow

    kwargs = {"params_file": args.params}
    if args.flow != "pipeline":
        kwargs["run"] = args.run
    state = run_flow(args.flow, **kwargs)
    flow_run_id = state.state_details.flow_run_id
    if not state.is_completed():
        log.error("flow %s (flow run %s) ended %s: %s", args.flow, flow_run_id, state.name, state.message)
        return 1
    target = f" {args.run}" if args.flow != "pipeline" else ""
    print(f"flow {args.flow}{target} completed (flow run {flow_run_id}); params {args.params}")
    return 0


def _node(args: argparse.Namespace) -> int:
    from pipelines.orchestration.nodes import FLOW_RUN_ID_ENV, NODE_RANK_ENV, node_rank

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        rank = node_rank()
    except ValueError as error:
        log.error("%s", error)
        return 2
    if rank == 0:
        if not command:
            log.error("flow node: node 0 runs the flow run's command: give it after --")
            return 2
        log.info("node 0: %s", " ".join(command))
        os.execvp(command[0], command)  # the pod's main process becomes the flow run (signals reach it)
    flow_run_id = os.environ.get(FLOW_RUN_ID_ENV)
    if not flow_run_id:
        log.error(
            "flow node: %s=%d, but %s is not set (the Prefect worker sets it)",
            NODE_RANK_ENV,
            rank,
            FLOW_RUN_ID_ENV,
        )
        return 2
    configure_prefect_environment()
    # this node's log lines stay in the pod's log: they belong to no flow run of their own
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    if args.verbose < 2:
        logging.getLogger("httpx").setLevel(logging.WARNING)
    from pipelines.orchestration.flows import follow_flow_run

    log.info("node %d follows flow run %s", rank, flow_run_id)
    return follow_flow_run(flow_run_id)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "flow",
        help="run the Prefect flows (one experiment, the two-stage chain, the whole pipeline)",
        description=(
            "Prefect flows over the pipeline's stages, with retries, persisted results and a comparison "
            "artifact. Without PREFECT_API_URL a temporary local Prefect server records the run. "
            "Deployments for work pools are in prefect.yaml (`prefect deploy`)."
        ),
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    run = actions.add_parser("run", help="run a flow in this process", description="Run a flow here.")
    flows = run.add_subparsers(dest="flow", metavar="FLOW", required=True)

    def add(name: str, text: str, *, with_run: bool) -> None:
        sub = flows.add_parser(name, help=text, description=text)
        if with_run:
            sub.add_argument("run", help="a run listed under runs in the params file")
        sub.add_argument("--params", default="params.yaml", help="params file (default params.yaml)")
        sub.set_defaults(func=_run)

    add(
        "experiment",
        "prepare -> weights -> train -> evaluate (each mode) -> compare, for one run",
        with_run=True,
    )
    add(
        "two-stage",
        "the chain ending at RUN (its init_from run first, then RUN from its checkpoint), then compare",
        with_run=True,
    )
    add("pipeline", "every run of the params file in order, then the report", with_run=False)

    node = actions.add_parser(
        "node",
        help="a pod of the Kubernetes work pool's job (deploy/kubernetes/)",
        description=(
            "A pod of a Kubernetes job of the vitadapter work pool. Node 0 (NODE_RANK unset or 0) runs "
            "COMMAND, the flow run (the worker gives `prefect flow-run execute`). Every other node follows "
            "that flow run (PREFECT__FLOW_RUN_ID) through the Prefect API and joins each torchrun launch "
            "of its training with its own NODE_RANK (MASTER_ADDR, MASTER_PORT: node 0's rendezvous), "
            "then exits 0 when the flow run ends."
        ),
    )
    node.add_argument("command", nargs=argparse.REMAINDER, help="-- the flow run's command (node 0)")
    node.set_defaults(func=_node)
