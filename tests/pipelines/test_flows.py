"""The Prefect flows, for real: under Prefect's test harness, and deployed to a real server and worker.

Every flow runs the real stages on a micro params file (a synthetic ADE20K twin of 8 + 3 images, a
tiny UperNet, 4 iterations; the two-stage chain a tiny Mask2Former on COCO-Stuff then ADE20K twins,
stage 1 under torchrun with 2 CPU processes). Nothing is mocked; Prefect and MLflow keep their state in
temporary folders, with telemetry off.
"""

from __future__ import annotations

import copy
import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import models
from micro_params import micro_params, write_params
from prefect_server import api, deployment_env, free_port, start_server, stop

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SERVER_START_TIMEOUT_S = 120
FLOW_RUN_TIMEOUT_S = 420

# A Mask2Former small enough for seconds per step on CPU (the tiny preset, fewer layers/queries/points).
TINY_M2F = {
    "decode_head.num_queries": 8,
    "decode_head.num_decoder_layers": 3,
    "decode_head.train_num_points": 64,
    "optimizer.lr": 0.0005,
    "schedule.warmup_iters": 2,
}


def _micro_file(root: Path, *, tracking: bool = True, **changes: Any) -> Path:
    """The micro params with every path (and the MLflow store) under ``root``."""
    params = micro_params(**changes)
    params["paths"] = {key: str(root / value) for key, value in params["paths"].items()}
    params["tracking"] = {
        **params["tracking"],
        "uri": f"sqlite:///{root / 'mlflow.db'}",
        "enabled": tracking,
    }
    root.mkdir(parents=True, exist_ok=True)
    return write_params(root / "params.yaml", params)


def _chain_file(root: Path) -> Path:
    """COCO-Stuff stage (torchrun, 2 CPU processes) -> ADE20K stage from its checkpoint."""
    base = micro_params()
    twin = base["datasets"]["ade20k"]
    train = {**base["runs"]["tiny"]["train"], "max_iters": 2, "log_interval": 1}
    train.update(eval_interval=2, checkpoint_interval=2)
    evaluation = {"modes": ["ss"], "limit": 1}
    runs = {
        "coco": {
            "config": "mask2former_beit_adapter_large_896_80k_cocostuff164k",
            "preset": "tiny",
            "overrides": TINY_M2F,
            "init_from": "none",
            "gpus": 2,
            "train": train,
            "eval": evaluation,
        },
        "ade": {
            "config": "mask2former_beit_adapter_large_896_80k_ade20k",
            "preset": "tiny",
            "overrides": TINY_M2F,
            "init_from": "coco",
            "train": train,
            "eval": evaluation,
        },
    }
    datasets = {"coco_stuff164k": copy.deepcopy(twin), "ade20k": copy.deepcopy(twin)}
    return _micro_file(root, datasets=datasets, runs=runs)


# -- Prefect in this process: the test harness ---------------------------------------------------------


@pytest.fixture(scope="session")
def prefect_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """PREFECT_HOME in a temporary folder, set before prefect is first imported."""
    home = tmp_path_factory.mktemp("prefect-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PREFECT_HOME", str(home))
        patch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        patch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        patch.delenv("PREFECT_API_URL", raising=False)
        yield home


@pytest.fixture(scope="session")
def harness(prefect_home: Path) -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=SERVER_START_TIMEOUT_S):
        yield


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in ``tmp_path``: the flows' persisted results (artifacts/prefect/results) land there."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PET_MASTER_PORT", str(free_port()))  # torchrun's rendezvous port
    return tmp_path


def _task_runs(flow_run_id: Any) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return sorted(runs, key=lambda run: run.start_time or run.expected_start_time)


def _artifacts(flow_run_id: Any) -> dict[str, Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {artifact.key: artifact for artifact in found}


def _mlflow_runs(root: Path, run: str, kind: str) -> list[Any]:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("micro")
    query = f"tags.`vitadapter.run` = '{run}' AND tags.`vitadapter.kind` = '{kind}'"
    return list(client.search_runs([experiment.experiment_id], query))


def _latest_flow_run(flow_name: str) -> Any:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        (latest,) = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
            sort=FlowRunSort.START_TIME_DESC,
            limit=1,
        )
    return latest


def test_experiment_command_runs_the_flow_end_to_end(harness: None, workdir: Path) -> None:
    from pipelines.cli import main

    params_file = _micro_file(workdir / "exp")
    assert main(["flow", "run", "experiment", "tiny", "--params", str(params_file)]) == 0
    flow_run = _latest_flow_run("experiment")
    assert flow_run.parameters == {"run": "tiny", "params_file": str(params_file)}
    assert flow_run.state.is_completed()
    flow_run_id = str(flow_run.id)
    tasks = _task_runs(flow_run_id)
    assert [task.name for task in tasks] == [
        "prepare-ade20k",
        "weights",
        "train-tiny",
        "evaluate-tiny-ss",
        "compare",
    ]
    assert all(task.state.is_completed() for task in tasks)

    metrics = workdir / "exp" / "metrics"
    for name in ("data/ade20k.json", "weights.json", "tiny/train.json", "tiny/eval_ss.json"):
        assert (metrics / name).is_file(), name
    evaluation = json.loads((metrics / "tiny" / "eval_ss.json").read_text())
    assert 0.0 <= evaluation["mIoU"] <= 100.0
    # persisted JSON results, one per task and one for the flow, under the working directory
    results = list((workdir / "artifacts" / "prefect" / "results").iterdir())
    assert any(path.name.startswith(f"train-{flow_run_id}-") for path in results)

    artifacts = _artifacts(flow_run_id)
    markdown, table = artifacts["experiment-tiny"], artifacts["experiment-tiny-table"]
    assert markdown.type == "markdown" and table.type == "table"
    assert "| tiny | upernet_deit_adapter_tiny_512_160k_ade20k | SS |" in markdown.data
    assert f"{evaluation['mIoU']:.2f}" in markdown.data
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    published = models.get_config("upernet_deit_adapter_tiny_512_160k_ade20k").published.miou_ss
    assert [(row["run"], row["mode"], row["published_miou"]) for row in rows] == [("tiny", "ss", published)]

    # the stages tagged their MLflow runs with this flow run (FLOW_RUN_ENV)
    (training,) = _mlflow_runs(workdir / "exp", "tiny", "train")
    assert training.data.tags["vitadapter.prefect_flow_run_id"] == flow_run_id

    # the whole graph on the same params: the stages reuse the shards and the finished run folder, and a
    # rerun of the finished run is a no-op everywhere (no new MLflow run, the metrics files untouched)
    from pipelines.orchestration.flows import pipeline_flow

    train_json, eval_json = metrics / "tiny" / "train.json", metrics / "tiny" / "eval_ss.json"
    written = {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in (train_json, eval_json)}
    mlflow_runs = {kind: len(_mlflow_runs(workdir / "exp", "tiny", kind)) for kind in ("train", "evaluation")}
    state = pipeline_flow(params_file=str(params_file), return_state=True)
    assert state.is_completed(), state.message
    names = [task.name for task in _task_runs(state.state_details.flow_run_id)]
    assert names == ["prepare-ade20k", "weights", "train-tiny", "evaluate-tiny-ss", "report", "compare"]
    report = workdir / "exp" / "artifacts" / "reports" / "report.md"
    assert "| tiny |" in report.read_text()
    assert json.loads((metrics / "tiny" / "train.json").read_text())["iterations"] == 4
    assert "pipeline" in _artifacts(state.state_details.flow_run_id)
    assert {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in written} == written
    assert {kind: len(_mlflow_runs(workdir / "exp", "tiny", kind)) for kind in mlflow_runs} == mlflow_runs


def test_failing_flows_end_failed_and_the_command_exits_non_zero(harness: None, workdir: Path) -> None:
    from pipelines.cli import main
    from pipelines.orchestration.flows import experiment_flow, two_stage_flow

    params_file = str(_micro_file(workdir / "bad"))
    state = experiment_flow(run="no_such_run", params_file=params_file, return_state=True)
    assert state.is_failed() and "no_such_run" in state.message
    assert main(["flow", "run", "experiment", "no_such_run", "--params", params_file]) == 1
    # a lone run is not a chain
    state = two_stage_flow(run="tiny", params_file=params_file, return_state=True)
    assert state.is_failed() and "does not start from another run" in state.message
    assert main(["flow", "run", "two-stage", "tiny", "--params", params_file]) == 1
    # the official download is not there: prepare fails, and so does the flow, before any training
    missing = {"ade20k": {"source": "raw", "raw": str(workdir / "no-ade20k-download")}}
    missing_file = str(_micro_file(workdir / "missing", datasets=missing))
    state = experiment_flow(run="tiny", params_file=missing_file, return_state=True)
    assert state.is_failed()
    tasks = _task_runs(state.state_details.flow_run_id)
    assert [(task.name, task.state.type.value) for task in tasks] == [("prepare-ade20k", "FAILED")]
    assert main(["flow", "run", "pipeline", "--params", missing_file]) == 1
    assert not (workdir / "missing" / "artifacts" / "runs").exists()


def test_torchrun_training_failures_are_retried(
    harness: None, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed torchrun launch is retried twice by the train task, then the flow fails."""
    from prefect import flow

    from pipelines.orchestration.flows import train_task

    runs = micro_params()["runs"]
    runs["tiny"]["gpus"] = 2  # torchrun with 2 CPU processes
    params_file = str(_micro_file(workdir / "retry", runs=runs))
    quick_retries = train_task.with_options(retry_delay_seconds=0)

    @flow
    def train_only() -> None:
        quick_retries(params_file, "tiny")

    # torchrun's rendezvous port is taken: every launch fails at once, as after a lost node
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        monkeypatch.setenv("PET_MASTER_PORT", str(taken.getsockname()[1]))
        state = train_only(return_state=True)
    assert (
        state.is_failed()
        and "TrainingProcessError" in state.message
        and "exited with status" in state.message
    )
    (task,) = _task_runs(state.state_details.flow_run_id)
    assert task.name == "train-tiny" and task.run_count == 3


def test_task_results_are_persisted_and_reused_within_a_flow_run(harness: None, workdir: Path) -> None:
    from prefect import flow

    from pipelines.orchestration.flows import prepare_task

    params_file = str(_micro_file(workdir / "cache"))

    @flow
    def prepare_twice() -> list[str]:
        states = [prepare_task(params_file, "ade20k", return_state=True) for _ in range(2)]
        return [state.name for state in states]

    assert prepare_twice() == ["Completed", "Cached"]
    assert prepare_twice() == ["Completed", "Cached"]  # a new flow run computes again
    stored = sorted(path.name for path in (workdir / "artifacts" / "prefect" / "results").iterdir())
    assert len([name for name in stored if name.startswith("prepare-")]) == 2
    summary = json.loads((workdir / "cache" / "metrics" / "data" / "ade20k.json").read_text())
    assert summary == {"counts_train": 8, "counts_val": 3}  # metric files: numbers only


def test_transient_failure_classification() -> None:
    import urllib.error

    from pipelines.engine.trainer import TrainingInterruptedError
    from pipelines.orchestration.flows import is_transient_download_failure, is_transient_training_failure
    from pipelines.runs.weights import WeightsNotFoundError

    offline = WeightsNotFoundError("could not be downloaded")
    offline.__cause__ = urllib.error.URLError("temporary failure in name resolution")
    assert is_transient_download_failure(offline)
    assert not is_transient_download_failure(WeightsNotFoundError("no URL known"))
    assert not is_transient_download_failure(ValueError("sha256 mismatch"))
    assert is_transient_training_failure(subprocess.CalledProcessError(1, ["torchrun"]))
    assert is_transient_training_failure(ConnectionResetError("peer reset"))
    assert not is_transient_training_failure(subprocess.CalledProcessError(-15, ["torchrun"]))
    assert not is_transient_training_failure(subprocess.CalledProcessError(143, ["torchrun"]))
    assert not is_transient_training_failure(TrainingInterruptedError("SIGTERM: checkpoint written"))
    assert not is_transient_training_failure(FileNotFoundError("no checkpoint"))
    assert not is_transient_training_failure(ValueError("bad override"))


def test_two_stage_flow_trains_stage_two_from_stage_one(harness: None, workdir: Path) -> None:
    from pipelines.orchestration.flows import two_stage_flow

    root = workdir / "chain"
    state = two_stage_flow(run="ade", params_file=str(_chain_file(root)), return_state=True)
    assert state.is_completed(), state.message
    flow_run_id = str(state.state_details.flow_run_id)
    names = [task.name for task in _task_runs(flow_run_id)]
    assert names == [
        "prepare-coco_stuff164k",
        "prepare-ade20k",
        "weights",
        "train-coco",
        "evaluate-coco-ss",
        "train-ade",
        "evaluate-ade-ss",
        "compare",
    ]
    # stage 2 was initialised from stage 1's checkpoint (the class layer re-initialised)
    keys = json.loads((root / "artifacts" / "runs" / "ade" / "key_report.json").read_text())
    assert Path(keys["init_from"]["source"]).parent == root / "artifacts" / "runs" / "coco"
    for run in ("coco", "ade"):
        assert (root / "metrics" / run / "eval_ss.json").is_file()
    # stage 1 ran under torchrun with two processes; only rank 0 reported
    (coco,) = _mlflow_runs(root, "coco", "train")
    assert coco.data.tags["vitadapter.prefect_flow_run_id"] == flow_run_id
    markdown = _artifacts(flow_run_id)["two-stage-ade"].data
    assert "| coco |" in markdown and "| ade |" in markdown


def test_configure_prefect_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines.commands.flow import configure_prefect_environment

    monkeypatch.chdir(tmp_path)
    no_profile = str(tmp_path / "profiles.toml")
    env: dict[str, str] = {"PREFECT_PROFILES_PATH": no_profile}
    home = configure_prefect_environment(env)
    assert home == tmp_path / "artifacts" / "prefect-home" and home.is_dir()
    assert env["PREFECT_HOME"] == str(home) and env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    server = {"PREFECT_PROFILES_PATH": no_profile, "PREFECT_API_URL": "http://127.0.0.1:4200/api"}
    assert configure_prefect_environment(server) is None and "PREFECT_HOME" not in server
    (tmp_path / "profiles.toml").write_text(
        'active = "team"\n[profiles.team]\nPREFECT_API_URL = "http://prefect:4200/api"\n'
    )
    profile = {"PREFECT_PROFILES_PATH": no_profile}
    assert configure_prefect_environment(profile) is None and "PREFECT_HOME" not in profile
    chosen = {"PREFECT_HOME": str(tmp_path / "new" / "home")}
    assert configure_prefect_environment(chosen) == tmp_path / "new" / "home"
    assert (tmp_path / "new" / "home").is_dir()


def test_prefect_yaml_declares_the_deployments() -> None:
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    entrypoints = {(d["entrypoint"], d["name"]): d for d in spec["deployments"]}
    for function in ("experiment_flow", "two_stage_flow", "pipeline_flow"):
        local = entrypoints[(f"pipelines/orchestration/flows.py:{function}", "local")]
        assert local["work_pool"]["name"] == "vitadapter-local"
        k8s = entrypoints[
            (f"pipelines.orchestration.flows:{function}", "k8s")
        ]  # the image's installed module
        assert k8s["work_pool"]["job_variables"]["gpus"] >= 1
        assert k8s["work_pool"]["job_variables"]["mlflow_tracking_uri"] == "{{ $MLFLOW_TRACKING_URI }}"
        assert "set_working_directory" in str(k8s["pull"])
    (pull,) = spec["pull"]
    assert pull["prefect.deployments.steps.set_working_directory"]["directory"] == "{{ project-dir.stdout }}"


# -- a deployment through a real `prefect server start` and `prefect worker start` --------------------

# The Kubernetes work pool: its committed base job template (tests/deploy/test_kubernetes_jobs.py renders
# and checks the jobs it makes); here the server checks the k8s deployments' job variables against it.
K8S_POOL: dict[str, Any] = {
    "name": "vitadapter-k8s",
    "type": "kubernetes",
    "base_job_template": json.loads((REPO / "deploy" / "kubernetes" / "base-job-template.json").read_text()),
}


def test_deployment_runs_through_a_real_server_and_worker(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/api"
    env = deployment_env(tmp_path, url, MLFLOW_TRACKING_URI="http://mlflow.example.org:5000")
    # MLflow is covered by the harness tests; off here, as a sqlite store would put ./mlruns in the
    # repository root (the deployment's working directory).
    params_file = _micro_file(tmp_path / "deployed", tracking=False)
    prefect_yaml = (REPO / "prefect.yaml").read_bytes()

    def prefect(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "prefect"), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
        )

    server_log, worker_log = tmp_path / "server.log", tmp_path / "worker.log"
    server = start_server(url, env, server_log)
    worker: subprocess.Popen[bytes] | None = None
    try:
        created = prefect("work-pool", "create", "vitadapter-local", "--type", "process")
        assert created.returncode == 0, created.stdout + created.stderr
        with worker_log.open("wb") as out:
            worker = subprocess.Popen(
                [str(BIN / "prefect"), "worker", "start", "--pool", "vitadapter-local"],
                cwd=tmp_path,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        # the Kubernetes pool cannot run here (no cluster); its deployments are still registered, and
        # the server checks their job variables against the variables prefect.yaml documents
        api(url, "/work_pools/", K8S_POOL)
        for name in ("local", "k8s"):  # the commands prefect.yaml documents
            deployed = prefect("--no-prompt", "deploy", "--name", name)
            assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        assert (REPO / "prefect.yaml").read_bytes() == prefect_yaml
        deployments = {}
        for deployment in api(url, "/deployments/filter", {}):
            deployments.setdefault(deployment["name"], []).append(deployment)
        assert sorted(deployments) == ["k8s", "local"] and len(deployments["local"]) == 3
        for deployment in deployments["local"]:  # the pull step returns to where `prefect deploy` ran
            (step,) = deployment["pull_steps"]
            assert step["prefect.deployments.steps.set_working_directory"] == {"directory": str(REPO)}
        for deployment in deployments["k8s"]:
            variables = deployment["job_variables"]
            assert variables["image"] == env["VITADAPTER_IMAGE"] and variables["gpus"] == 8
            assert variables["mlflow_tracking_uri"] == env["MLFLOW_TRACKING_URI"]
        wrong = {**deployments["k8s"][0], "job_variables": {"gpus": "eight"}}
        wrong = {key: wrong[key] for key in ("name", "flow_id", "work_pool_name", "job_variables")}
        with pytest.raises(urllib.error.HTTPError, match="422"):
            api(url, "/deployments/", {**wrong, "name": "k8s-wrong"})

        run = prefect(
            "deployment",
            "run",
            "experiment/local",
            "--param",
            "run=tiny",
            "--param",
            f"params_file={params_file}",
            "--watch",
            "--watch-timeout",
            str(FLOW_RUN_TIMEOUT_S),
            timeout=FLOW_RUN_TIMEOUT_S + 60,
        )
        assert run.returncode == 0, run.stdout + run.stderr + worker_log.read_text()[-4000:]
        assert [r["state_type"] for r in api(url, "/flow_runs/filter", {})] == ["COMPLETED"]
        assert (tmp_path / "deployed" / "metrics" / "tiny" / "eval_ss.json").is_file()
        artifacts = api(url, "/artifacts/filter", {"artifacts": {"key": {"any_": ["experiment-tiny"]}}})
        assert "| tiny |" in artifacts[0]["data"]
        assert any((tmp_path / "results").iterdir())

        failing = prefect(
            "deployment",
            "run",
            "experiment/local",
            "--param",
            "run=no_such_run",
            "--param",
            f"params_file={params_file}",
            "--watch",
        )
        assert failing.returncode == 1, failing.stdout + failing.stderr
        # the project's own command, against the same server: a failed flow exits 1 too
        command = subprocess.run(
            [
                str(BIN / "vitadapter"),
                "flow",
                "run",
                "experiment",
                "no_such_run",
                "--params",
                str(params_file),
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert command.returncode == 1, command.stdout + command.stderr
        states = sorted(r["state_type"] for r in api(url, "/flow_runs/filter", {}))
        assert states == ["COMPLETED", "FAILED", "FAILED"]
    finally:
        if worker is not None:
            stop(worker)
        stop(server)
    assert server.returncode is not None and (worker is None or worker.returncode is not None)
