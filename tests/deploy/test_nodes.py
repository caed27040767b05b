"""A pod of the Kubernetes pool's job, for real on this machine: its size from the environment, its entry
command, and (slow) a two-node training where two local processes stand in for pods 0 and 1.

The two-node test runs what the rendered Job runs in each pod (``vitadapter flow node -- prefect flow-run
execute`` with NODE_RANK, MASTER_ADDR, MASTER_PORT, VITADAPTER_GPUS, VITADAPTER_NODES and the worker's
PREFECT__FLOW_RUN_ID) against a real Prefect server: pod 0 executes the experiment flow run (prepare,
weights, train, evaluate, compare), whose train task launches torchrun as node 0 of 2; pod 1 follows the
flow run through the API, joins that launch as node 1 and exits when the flow run ends. The differences
from a cluster: both "pods" are processes on 127.0.0.1 (MASTER_ADDR is loopback, not pod 0's DNS name
under the headless Service) and train on CPU (gloo, one process per node).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from micro_params import micro_params, write_params
from pipelines.cli import main
from pipelines.config.params import load_params
from pipelines.config.strict import ParamsError
from pipelines.orchestration.stages import run_signature
from prefect_server import api30, free_port, start_server, stop

BIN = Path(sys.executable).parent
SERVER_START_TIMEOUT_S = 240
RUN_TIMEOUT_S = 900


def _micro_file(root: Path, **run_changes: Any) -> Path:
    params = micro_params()
    params["paths"] = {key: str(root / value) for key, value in params["paths"].items()}
    params["tracking"] = {**params["tracking"], "uri": f"sqlite:///{root / 'mlflow.db'}", "enabled": False}
    params["runs"]["tiny"].update(run_changes)
    return write_params(root / "params.yaml", params)


def test_the_pods_size_decides_every_runs_launch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    params_file = _micro_file(tmp_path, gpus=0, nodes=1)
    local = load_params(params_file)
    monkeypatch.setenv("VITADAPTER_GPUS", "4")
    monkeypatch.setenv("VITADAPTER_NODES", "2")
    pod = load_params(params_file)
    assert (pod.run("tiny").gpus, pod.run("tiny").nodes) == (4, 2)
    # the launch is part of the training definition: a run folder trained locally is not resumed as it
    assert run_signature(pod, "tiny") != run_signature(local, "tiny")
    for name, text, message in (
        ("VITADAPTER_GPUS", "four", "VITADAPTER_GPUS='four'.*not an integer"),
        ("VITADAPTER_GPUS", "-1", "VITADAPTER_GPUS=-1.*>= 0"),
        ("VITADAPTER_NODES", "0", "VITADAPTER_NODES=0.*>= 1"),
    ):
        with monkeypatch.context() as patch:
            patch.setenv(name, text)
            with pytest.raises(ParamsError, match=message):
                load_params(params_file)
    monkeypatch.delenv("VITADAPTER_GPUS")
    monkeypatch.delenv("VITADAPTER_NODES")
    assert load_params(params_file) == local


def test_flow_node_refuses_what_a_pod_cannot_run(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("NODE_RANK", raising=False)
    monkeypatch.delenv("PREFECT__FLOW_RUN_ID", raising=False)
    assert main(["flow", "node"]) == 2
    assert "node 0 runs the flow run's command" in caplog.text
    monkeypatch.setenv("NODE_RANK", "one")
    assert main(["flow", "node", "--", "true"]) == 2
    assert "NODE_RANK='one'" in caplog.text
    monkeypatch.setenv("NODE_RANK", "1")
    assert main(["flow", "node", "--", "true"]) == 2
    assert "PREFECT__FLOW_RUN_ID is not set" in caplog.text


def test_node_zero_becomes_the_flow_runs_command() -> None:
    # exec, not a child: the pod's main process is the flow run, and Kubernetes' SIGTERM reaches it
    env = {**os.environ, "NODE_RANK": "0"}
    process = subprocess.Popen(
        [
            str(BIN / "vitadapter"),
            "flow",
            "node",
            "--",
            sys.executable,
            "-c",
            "import os; print(os.getpid())",
        ],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0
    assert out.split() == [str(process.pid)]


@pytest.mark.slow
def test_two_pods_train_one_run_together(tmp_path: Path) -> None:
    params_file = _micro_file(tmp_path, gpus=0, nodes=1)  # the pods' size comes from their environment
    (tmp_path / "home").mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    base = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "home"),
        "PREFECT_API_URL": url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp_path / "results"),
    }
    logs = {name: tmp_path / f"{name}.log" for name in ("server", "pod0", "pod1")}
    server = start_server(url, base, logs["server"], timeout_s=SERVER_START_TIMEOUT_S, request_timeout=30)
    pods: list[subprocess.Popen[bytes]] = []
    try:
        # a deployment as prefect.yaml's k8s ones are (the installed module, a working folder), and a flow run
        flow = api30(url, "/flows/", {"name": "experiment"})
        deployment = api30(
            url,
            "/deployments/",
            {
                "name": "two-pods",
                "flow_id": flow["id"],
                "entrypoint": "pipelines.orchestration.flows:experiment_flow",
                "pull_steps": [
                    {"prefect.deployments.steps.set_working_directory": {"directory": str(tmp_path)}}
                ],
            },
        )
        parameters = {"run": "tiny", "params_file": str(params_file)}
        flow_run = api30(url, f"/deployments/{deployment['id']}/create_flow_run", {"parameters": parameters})
        rendezvous = str(free_port())
        for rank in (0, 1):  # the environment the rendered Job gives pod `rank` (the Service name aside)
            env = {
                **base,
                "PREFECT__FLOW_RUN_ID": flow_run["id"],
                "NODE_RANK": str(rank),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": rendezvous,
                "VITADAPTER_GPUS": "1",
                "VITADAPTER_NODES": "2",
            }
            with logs[f"pod{rank}"].open("wb") as out:
                pods.append(
                    subprocess.Popen(
                        [
                            str(BIN / "vitadapter"),
                            "flow",
                            "node",
                            "--",
                            str(BIN / "prefect"),
                            "flow-run",
                            "execute",
                        ],
                        cwd=tmp_path,
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        for rank, pod in enumerate(pods):
            try:
                pod.wait(timeout=RUN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pytest.fail(
                    f"pod {rank} still running after {RUN_TIMEOUT_S} s:\n{logs[f'pod{rank}'].read_text()[-4000:]}"
                )
        detail = "\n".join(
            f"--- {name}\n{path.read_text()[-3000:]}" for name, path in logs.items() if name != "server"
        )
        assert [pod.returncode for pod in pods] == [0, 0], detail
        assert api30(url, f"/flow_runs/{flow_run['id']}")["state_type"] == "COMPLETED", detail
        follower = logs["pod1"].read_text()
        assert (
            "run tiny, attempt 1: launch 1" in follower and "this node's training has finished" in follower
        ), detail
        diff = json.loads((tmp_path / "artifacts" / "runs" / "tiny" / "recipe_diff.json").read_text())
        assert diff["setup"]["plan"]["world_size"] == 2, diff["setup"]  # one process on each of two nodes
        assert (tmp_path / "metrics" / "tiny" / "train.json").is_file()
        assert (tmp_path / "metrics" / "tiny" / "eval_ss.json").is_file()  # node 0 went on alone to evaluate
    finally:
        for pod in pods:
            stop(pod, grace_s=30)
        stop(server, grace_s=30)
