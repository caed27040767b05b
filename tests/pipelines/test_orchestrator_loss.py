"""The orchestrator goes away mid-run, for real: nothing finished is lost and a rerun resumes.

Each row of the README table "When the orchestrator goes away" is checked here, with the real trainer:

* the guarded training's own error reaches the flow with its message and kind (the one test of the default run;
  the others train for minutes on a busy machine);
* (slow) the process that started a training (as the flow's train task does) is killed: the training, a
  guarded process of its own session, stops after the iteration with a checkpoint
  (pipelines/orchestration/guardian.py);
* (slow) ``vitadapter flow run`` against a real ``prefect server start`` that is killed mid-training and stays
  down: the training and the evaluation go on to their end, the command ends with one line naming the server;
* (slow) ``vitadapter flow run`` interrupted (SIGINT to its process group, as Ctrl-C in a terminal): the
  training stops with a checkpoint and the command waits for it;
* (slow) a deployment on a real server and process worker: the server killed and restarted at once (the flow
  run completes), killed and kept down (the flow run is left Running, the rerun reuses the training), the
  flow-run process killed, the worker stopped (SIGTERM) and killed (SIGKILL), the deployment rerun each time.

The micro params (tests/micro_params.py) with enough iterations to stop something in the middle.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from micro_params import micro_params, write_params
from prefect_server import BIN, api, deployment_env, free_port, kill_group, prefect_env, start_server, stop

REPO = Path(__file__).resolve().parents[2]
WAIT_S = 900  # generous: the machines these tests run on may be busy
SLOW_TIMEOUT_S = 2400  # the slow tests' pytest-timeout: each waits for whole trainings and retries

# the parent that a flow-run process stands for: it trains through the guarded child, as the train task does
PARENT = """
import sys
from pathlib import Path
from pipelines.config.params import load_params
from pipelines.orchestration import stages
stages.train_stage(load_params(sys.argv[1]), "tiny", params_file=Path(sys.argv[1]), isolated=True)
"""


def _params(root: Path, *, iterations: int, **train: Any) -> Path:
    """Micro params under ``root``: ``iterations`` of the tiny UperNet, a log line per iteration, no MLflow."""
    params = micro_params()
    params["paths"] = {key: str(root / value) for key, value in params["paths"].items()}
    params["tracking"] = {**params["tracking"], "uri": f"sqlite:///{root / 'mlflow.db'}", "enabled": False}
    params["runs"]["tiny"]["train"].update(
        max_iters=iterations, log_interval=1, checkpoint_interval=1000, eval_interval=1000, **train
    )
    root.mkdir(parents=True, exist_ok=True)
    return write_params(root / "params.yaml", params)


def _logged_iteration(run_dir: Path) -> int:
    """The last iteration ``train_log.jsonl`` records (0 before the first)."""
    from pipelines.runs.folder import RunFolder

    records = RunFolder(run_dir).read_log() if (run_dir / "train_log.jsonl").is_file() else []
    return max((int(r["iteration"]) for r in records), default=0)


def _wait(condition: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def _folder_free(run_dir: Path) -> bool:
    """Whether no process holds the run folder's lock (the training process has exited)."""
    from pipelines.runs.folder import RunFolder, RunFolderBusyError

    try:
        with RunFolder(run_dir).exclusive():
            return True
    except RunFolderBusyError:
        return False


def _prepared(params_file: Path) -> None:
    from pipelines.config.params import load_params
    from pipelines.orchestration.stages import prepare_stage

    prepare_stage(load_params(params_file), "ade20k")


@pytest.mark.slow
@pytest.mark.timeout(SLOW_TIMEOUT_S)
def test_training_stops_with_a_checkpoint_when_the_process_that_started_it_is_killed(tmp_path: Path) -> None:
    """SIGKILL of the process that trains through the guarded child, as the flow's train task does (what an
    OOM killer or a stopped worker does to a flow-run process): the training notices and stops with a
    checkpoint at the iteration it reached, with its optimizer state."""
    from models.checkpoint import load_checkpoint_file
    from pipelines.runs.folder import RunFolder

    iterations = 400
    params_file = _params(tmp_path, iterations=iterations)
    _prepared(params_file)
    run_dir = tmp_path / "artifacts" / "runs" / "tiny"
    with (tmp_path / "parent.log").open("wb") as out:
        parent = subprocess.Popen(
            [sys.executable, "-c", PARENT, str(params_file)],
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait(lambda: _logged_iteration(run_dir) >= 3 or parent.poll() is not None, "three iterations")
        assert parent.poll() is None, (tmp_path / "parent.log").read_text()[-3000:]
        reached = _logged_iteration(run_dir)
        parent.kill()
        parent.wait(timeout=60)
    finally:
        if parent.poll() is None:
            parent.kill()
    _wait(lambda: _folder_free(run_dir), "the training process to stop", timeout=120)
    latest = RunFolder(run_dir).latest_iteration()
    # no periodic checkpoint falls in this range (every 1000): this one is the stop's, after the signal
    assert latest is not None and reached <= latest < iterations
    assert _logged_iteration(run_dir) == latest
    state = load_checkpoint_file(RunFolder(run_dir).latest_checkpoint())
    assert state["iteration"] == latest and state["optimizer"]["state"]


def test_a_failed_training_process_reports_its_own_error(tmp_path: Path) -> None:
    """The guarded child's error reaches the flow as the same message, with its kind (not a bare exit status)."""
    from pipelines.config.params import load_params
    from pipelines.orchestration import stages
    from pipelines.orchestration.flows import is_transient_training_failure
    from pipelines.orchestration.guardian import TrainingProcessError

    params_file = _params(tmp_path, iterations=4)  # no shards prepared: the training cannot start
    params = load_params(params_file)
    with pytest.raises(FileNotFoundError) as here:
        stages.train_stage(params, "tiny", params_file=params_file)
    with pytest.raises(TrainingProcessError) as child:
        stages.train_stage(params, "tiny", params_file=params_file, isolated=True)
    assert str(child.value) == str(here.value)
    assert "FileNotFoundError" in child.value.kinds and child.value.returncode == 1
    assert not is_transient_training_failure(child.value)  # a retry would fail the same way


@pytest.mark.slow
@pytest.mark.timeout(SLOW_TIMEOUT_S)
def test_a_prefect_server_stopped_mid_training(tmp_path: Path) -> None:
    """A real server SIGKILLed (and left down) while ``vitadapter flow run experiment`` trains: the training
    and the evaluation go on to their end, the command exits 1 with one line naming the server and the
    recovery."""
    iterations = 40
    params_file = _params(tmp_path / "exp", iterations=iterations)
    url = f"http://127.0.0.1:{free_port()}/api"
    # one retry per API call (Prefect's client retries 5 times, about a minute, by default)
    env = prefect_env(tmp_path / "prefect-home", url, PREFECT_CLIENT_MAX_RETRIES="1")
    run_dir = tmp_path / "exp" / "artifacts" / "runs" / "tiny"
    server = start_server(url, env, tmp_path / "server.log")
    command: subprocess.Popen[bytes] | None = None
    try:
        with (tmp_path / "command.log").open("wb") as out:
            command = subprocess.Popen(
                [str(BIN / "vitadapter"), "flow", "run", "experiment", "tiny", "--params", str(params_file)],
                cwd=tmp_path,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _wait(lambda: _logged_iteration(run_dir) >= 2 or command.poll() is not None, "two iterations")
        assert command.poll() is None, (tmp_path / "command.log").read_text()[-3000:]
        kill_group(server)
        assert _logged_iteration(run_dir) < iterations, "the training ended before the server was stopped"
        returncode = command.wait(timeout=WAIT_S)
        output = (tmp_path / "command.log").read_text()
        assert returncode == 1, output[-3000:]
        # the training went on to its end without the server, and so did the evaluation
        assert _logged_iteration(run_dir) == iterations
        train_metrics = tmp_path / "exp" / "metrics" / "tiny" / "train.json"
        assert json.loads(train_metrics.read_text())["iterations"] == iterations
        assert (tmp_path / "exp" / "metrics" / "tiny" / "eval_ss.json").is_file()
        errors = [
            line
            for line in output.splitlines()
            if " ERROR vitadapter" in line or "ERROR pipelines.cli" in line
        ]
        assert errors, output[-3000:]
        assert f"the Prefect server {url} stopped answering" in errors[-1]
        assert "rerun the same command" in errors[-1]

        # the server back, the same command again: the training is reused, not redone
        trained = (run_dir / "train_log.jsonl").read_bytes()
        server = start_server(url, env, tmp_path / "server.log")
        rerun = subprocess.run(
            [str(BIN / "vitadapter"), "flow", "run", "experiment", "tiny", "--params", str(params_file)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=WAIT_S,
        )
        assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-3000:]
        assert (run_dir / "train_log.jsonl").read_bytes() == trained
    finally:
        if command is not None:
            stop(command)
        stop(server)


@pytest.mark.slow
@pytest.mark.timeout(SLOW_TIMEOUT_S)
def test_flow_run_command_interrupted_stops_the_training_with_a_checkpoint(tmp_path: Path) -> None:
    """SIGINT to the process group of ``vitadapter flow run`` (Ctrl-C in its terminal) mid-training: the
    command asks the training to stop, waits for its checkpoint, and exits non-zero; rerunning the command
    resumes from that checkpoint and trains every iteration once."""
    from pipelines.runs.folder import RunFolder

    iterations = 14
    params_file = _params(tmp_path / "exp", iterations=iterations)
    url = f"http://127.0.0.1:{free_port()}/api"
    env = prefect_env(tmp_path / "prefect-home", url)
    run_dir = tmp_path / "exp" / "artifacts" / "runs" / "tiny"
    command_line = [
        str(BIN / "vitadapter"),
        "flow",
        "run",
        "experiment",
        "tiny",
        "--params",
        str(params_file),
    ]
    server = start_server(url, env, tmp_path / "server.log")
    command: subprocess.Popen[bytes] | None = None
    try:
        with (tmp_path / "command.log").open("wb") as out:
            command = subprocess.Popen(
                command_line,
                cwd=tmp_path,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _wait(lambda: _logged_iteration(run_dir) >= 2 or command.poll() is not None, "two iterations")
        assert command.poll() is None, (tmp_path / "command.log").read_text()[-3000:]
        reached = _logged_iteration(run_dir)
        os.killpg(command.pid, signal.SIGINT)
        returncode = command.wait(timeout=WAIT_S)
        output = (tmp_path / "command.log").read_text()
        assert returncode != 0, output[-3000:]
        assert _folder_free(run_dir), output[-3000:]  # the command waited for the training to end
        stopped = RunFolder(run_dir).latest_iteration()
        assert stopped is not None and reached <= stopped < iterations, output[-3000:]
        assert "asked the training" in output and f"stopped by SIGTERM after iteration {stopped}" in output

        rerun = subprocess.run(
            command_line, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=WAIT_S
        )
        assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-3000:]
        logged = [record["iteration"] for record in RunFolder(run_dir).read_log()]
        assert logged == list(range(1, iterations + 1))
    finally:
        if command is not None:
            stop(command)
        stop(server)


def _flow_runs(url: str) -> dict[str, dict[str, Any]]:
    """The server's flow runs by id."""
    return {run["id"]: run for run in api(url, "/flow_runs/filter", {})}


def _children(pid: int) -> list[int]:
    """The child processes of ``pid`` (a process worker's are its flow-run processes)."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(child) for child in (task / "children").read_text().split()]
        except OSError:  # the thread ended meanwhile
            continue
    return children


@pytest.mark.slow
@pytest.mark.timeout(SLOW_TIMEOUT_S)
def test_a_deployment_survives_a_stopped_server_and_a_stopped_or_killed_worker(tmp_path: Path) -> None:
    """``prefect deploy`` of prefect.yaml on a real server with a real process worker, then mid-training:

    1. the server killed and restarted at once: the flow run completes, as if nothing had happened;
    2. the server killed and kept down until the flow-run process gave up (Prefect's client retries): the
       training went on to its end, the flow run is left Running, the rerun reuses the training and completes;
    3. the flow-run process killed (SIGKILL), then, in the rerun, the worker stopped (SIGTERM): each time the
       training stops with a checkpoint, and the last rerun completes it with every iteration trained once;
    4. the worker killed (SIGKILL): its flow-run process lives on and completes the flow run itself.
    """
    from pipelines.runs.folder import RunFolder

    url = f"http://127.0.0.1:{free_port()}/api"
    env = deployment_env(tmp_path, url)
    worker_log = tmp_path / "worker.log"

    def prefect(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "prefect"), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
        )

    def start_worker() -> subprocess.Popen[bytes]:
        with worker_log.open("ab") as out:
            return subprocess.Popen(
                [str(BIN / "prefect"), "worker", "start", "--pool", "vitadapter-local"],
                cwd=tmp_path,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def run_deployment(params_file: Path, *, watch: bool) -> subprocess.CompletedProcess[str]:
        args = [
            "deployment",
            "run",
            "experiment/local",
            "--param",
            "run=tiny",
            "--param",
            f"params_file={params_file}",
        ]
        return prefect(
            *args, *(["--watch", "--watch-timeout", str(WAIT_S)] if watch else []), timeout=WAIT_S + 60
        )

    def rerun_to_completion(params_file: Path) -> None:
        rerun = run_deployment(params_file, watch=True)
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr + worker_log.read_text()[-4000:]

    def started(
        params_file: Path, run_dir: Path, worker: subprocess.Popen[bytes], *, after: int = 0
    ) -> tuple[str, int]:
        """Launch the deployment; the new flow run's id and the iteration it reached (beyond ``after``)."""
        before = set(_flow_runs(url))
        launched = run_deployment(params_file, watch=False)
        assert launched.returncode == 0, launched.stdout + launched.stderr
        _wait(
            lambda: _logged_iteration(run_dir) >= after + 2 or worker.poll() is not None,
            f"training in {run_dir}",
        )
        assert worker.poll() is None, worker_log.read_text()[-4000:]
        (flow_run_id,) = set(_flow_runs(url)) - before
        return flow_run_id, _logged_iteration(run_dir)

    def state_of(flow_run_id: str) -> str:
        return _flow_runs(url)[flow_run_id]["state_type"]

    def ended(flow_run_id: str) -> bool:
        return state_of(flow_run_id) in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")

    iterations = {"restart": 60, "down": 20, "stop": 40, "sigkill": 20}
    roots = {name: tmp_path / name for name in iterations}
    params = {name: _params(roots[name], iterations=count) for name, count in iterations.items()}
    runs = {name: root / "artifacts" / "runs" / "tiny" for name, root in roots.items()}
    server = start_server(url, env, tmp_path / "server.log")
    worker: subprocess.Popen[bytes] | None = None
    orphans: list[int] = []
    try:
        created = prefect("work-pool", "create", "vitadapter-local", "--type", "process")
        assert created.returncode == 0, created.stdout + created.stderr
        deployed = prefect("--no-prompt", "deploy", "--name", "local")
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        worker = start_worker()

        # 1. the server killed and restarted at once (the same database): the flow run completes by itself
        flow_run_id, reached = started(params["restart"], runs["restart"], worker)
        kill_group(server)
        server = start_server(url, env, tmp_path / "server.log")
        assert _logged_iteration(runs["restart"]) < iterations["restart"], (
            "trained to the end before the restart"
        )
        _wait(lambda: ended(flow_run_id), "the flow run's end")
        assert state_of(flow_run_id) == "COMPLETED", worker_log.read_text()[-4000:]
        assert _logged_iteration(runs["restart"]) == iterations["restart"]
        assert (roots["restart"] / "metrics" / "tiny" / "eval_ss.json").is_file()

        # 2. the server killed and kept down until the flow-run process gave up: the training went on to its end
        flow_run_id, reached = started(params["down"], runs["down"], worker)
        kill_group(server)
        _wait(lambda: not _children(worker.pid), "the flow-run process to give up")
        assert _logged_iteration(runs["down"]) == iterations["down"] and _folder_free(runs["down"])
        trained = (runs["down"] / "train_log.jsonl").read_bytes()
        server = start_server(url, env, tmp_path / "server.log")
        assert worker.poll() is None, worker_log.read_text()[-4000:]  # the worker waited for the server
        assert state_of(flow_run_id) == "RUNNING"  # nobody reported its end
        rerun_to_completion(params["down"])
        assert (runs["down"] / "train_log.jsonl").read_bytes() == trained  # reused, not trained again
        assert (roots["down"] / "metrics" / "tiny" / "eval_ss.json").is_file()

        # 3. the flow-run process killed, then the worker stopped: each time the training stops with a checkpoint
        flow_run_id, reached = started(params["stop"], runs["stop"], worker)
        (flow_run_process,) = _children(worker.pid)
        os.kill(flow_run_process, signal.SIGKILL)
        _wait(lambda: _folder_free(runs["stop"]) and ended(flow_run_id), "the training to stop", timeout=300)
        assert state_of(flow_run_id) == "CRASHED"  # the worker saw its process die
        first_stop = RunFolder(runs["stop"]).latest_iteration()
        assert first_stop is not None and reached <= first_stop < iterations["stop"]  # checkpoints every 1000
        flow_run_id, reached = started(params["stop"], runs["stop"], worker, after=first_stop)
        os.kill(worker.pid, signal.SIGTERM)
        worker.wait(timeout=120)
        _wait(lambda: _folder_free(runs["stop"]), "the training to stop", timeout=300)
        second_stop = RunFolder(runs["stop"]).latest_iteration()
        assert second_stop is not None and reached <= second_stop < iterations["stop"]
        worker = start_worker()
        rerun_to_completion(params["stop"])
        logged = [record["iteration"] for record in RunFolder(runs["stop"]).read_log()]
        assert logged == list(range(1, iterations["stop"] + 1))  # resumed each time: every iteration once

        # 4. the worker killed: its flow-run process lives on and completes the flow run itself
        flow_run_id, reached = started(params["sigkill"], runs["sigkill"], worker)
        orphans = _children(worker.pid)  # in sessions of their own: the worker's process group misses them
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=60)
        _wait(lambda: ended(flow_run_id), "the flow run")
        assert state_of(flow_run_id) == "COMPLETED"
        assert _logged_iteration(runs["sigkill"]) == iterations["sigkill"]
    finally:
        if worker is not None:
            stop(worker)
        for pid in orphans:  # a flow-run process outliving the killed worker (it may still flush its events)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        stop(server)
