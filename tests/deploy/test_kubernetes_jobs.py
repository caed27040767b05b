"""The Kubernetes work pool as files, tested as far as no cluster goes.

One real ``prefect server`` on loopback serves the module. On it the pool is created from the committed
``deploy/kubernetes/base-job-template.json`` (``prefect work-pool create``) and prefect.yaml's k8s
deployments are deployed (``prefect deploy --name k8s``). For flow runs of each deployment (its job
variables, and per-run overrides such as ``gpus=4`` or ``nodes=2``), prefect-kubernetes' own worker code
(``KubernetesWorkerJobConfiguration.resolve_for_flow_run``, what the worker runs before it submits a
job) renders the Job manifest; :mod:`kube_checks` validates it against the Kubernetes API's schema and
rules, and each test checks where Kubernetes reads the image, resources, volumes and environment, and
that the training's torchrun command in each pod follows ``gpus`` and ``nodes``. Broken copies of the
template fail. Nothing reaches a cluster: none can be reached from here.
"""

from __future__ import annotations

import asyncio
import copy
import importlib.util
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kube_checks import ManifestError, check_document, check_job, pod_environment

from prefect_server import api30, free_port, start_server, stop

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TEMPLATE_FILE = REPO / "deploy" / "kubernetes" / "base-job-template.json"
CLUSTER_FILE = REPO / "deploy" / "kubernetes" / "cluster.yaml"
SERVER_START_TIMEOUT_S = 240  # a busy 2-core machine: migrations of a fresh database take a while
IMAGE = "registry.example.org/vitadapter:0.1.0"
MLFLOW_URI = "http://mlflow.mlflow.svc:5000"
JOB_NAME = "experiment-abc12"  # a name the API would give a job of generateName <flow run>-
FLOWS = {"experiment/k8s": "experiment", "two-stage/k8s": "two-stage", "pipeline/k8s": "pipeline"}


def _tool():
    spec = importlib.util.spec_from_file_location("k8s_job_template", REPO / "tools" / "k8s_job_template.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class Server:
    url: str
    env: dict[str, str]

    def prefect(self, *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "prefect"), *args], cwd=cwd, env=self.env, capture_output=True, text=True, timeout=300
        )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A real server with the pool from the committed template and prefect.yaml's k8s deployments."""
    root = tmp_path_factory.mktemp("k8s-pool")
    (root / "home").mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(root / "home"),
        "PREFECT_API_URL": url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_CLI_PROMPT": "false",
        "VITADAPTER_IMAGE": IMAGE,  # read by `prefect deploy` (prefect.yaml's k8s job variables)
        "MLFLOW_TRACKING_URI": MLFLOW_URI,
    }
    process = start_server(
        url, env, root / "server.log", timeout_s=SERVER_START_TIMEOUT_S, request_timeout=30
    )
    try:
        running = Server(url, env)
        # the commands README "On a cluster" gives
        created = running.prefect(
            "work-pool",
            "create",
            "vitadapter-k8s",
            "--type",
            "kubernetes",
            "--base-job-template",
            str(TEMPLATE_FILE),
        )
        assert created.returncode == 0, created.stdout + created.stderr
        deployed = running.prefect("--no-prompt", "deploy", "--name", "k8s")
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        yield running
    finally:
        stop(process)


def _render(server: Server, deployment: str, job_variables: dict[str, Any], parameters: dict[str, Any]):
    """The Job manifest the Kubernetes worker would submit for a new flow run of ``deployment``."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    async def render() -> tuple[dict[str, Any], Any]:
        async with get_client() as client:
            found = await client.read_deployment_by_name(deployment)
            flow_run = await client.create_flow_run_from_deployment(
                found.id, parameters=parameters, job_variables=job_variables
            )
            pool = await client.read_work_pool(found.work_pool_name)
            configuration = await KubernetesWorkerJobConfiguration.resolve_for_flow_run(
                flow_run, client=client, work_pool=pool, worker_name="vitadapter-test", deployment=found
            )
            return configuration.job_manifest, flow_run

    with temporary_settings(updates={PREFECT_API_URL: server.url}):
        return asyncio.run(render())


def _torchrun(env: dict[str, str], run: str, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The torchrun command the flow (node 0) or a following node launches for ``run`` in a pod with ``env``."""
    from pipelines.orchestration.nodes import follower_command

    with monkeypatch.context() as patch:
        for name in ("VITADAPTER_GPUS", "VITADAPTER_NODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
            patch.setenv(name, env[name])
        return follower_command(str(REPO / "params.yaml"), run)


def expect_job(
    manifest: dict[str, Any], *, gpus: int, nodes: int, flow_run_id: str, url: str
) -> dict[str, str]:
    """Check a rendered Job as the API would, and where Kubernetes reads what the pool's variables set.

    Returns:
        Pod 0's environment.

    Raises:
        ManifestError: naming every problem.
    """
    check_job(manifest)
    problems = []

    def expect(what: str, got: Any, wanted: Any) -> None:
        if got != wanted:
            problems.append(f"{what}: {got!r}, expected {wanted!r}")

    spec = manifest["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    expect("completionMode", spec.get("completionMode"), "Indexed")
    expect("completions", spec.get("completions"), nodes)
    expect("parallelism", spec.get("parallelism"), nodes)
    expect("subdomain (the headless Service)", pod.get("subdomain"), "vitadapter-torchrun")
    expect("pod labels", spec["template"]["metadata"]["labels"].get("vitadapter.io/torchrun"), "true")
    expect("flow-run label", manifest["metadata"]["labels"].get("prefect.io/flow-run-id"), flow_run_id)
    expect("runAsNonRoot", pod["securityContext"].get("runAsNonRoot"), True)
    expect("fsGroup", pod["securityContext"].get("fsGroup"), 1000)
    expect("image", container.get("image"), IMAGE)
    expect("command", container.get("command"), ["vitadapter", "flow", "node", "--"])
    expect("args (the worker's command)", container.get("args"), ["prefect", "flow-run", "execute"])
    resources = container["resources"]
    for kind in ("requests", "limits"):
        got = resources.get(kind, {}).get("nvidia.com/gpu")
        expect(f"GPU {kind}", None if got is None else int(got), gpus)
    expect("cpu request", resources["requests"].get("cpu"), "32")
    expect("memory request", resources["requests"].get("memory"), "256Gi")
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
    expect(
        "artifacts claim",
        volumes.get("artifacts", {}).get("persistentVolumeClaim"),
        {"claimName": "vitadapter-artifacts"},
    )
    expect("artifacts mount", mounts.get("/opt/vitadapter/artifacts", {}).get("name"), "artifacts")
    expect(
        "metrics mount",
        mounts.get("/opt/vitadapter/metrics"),
        {"name": "artifacts", "mountPath": "/opt/vitadapter/metrics", "subPath": "metrics"},
    )
    expect("/dev/shm mount", mounts.get("/dev/shm", {}).get("name"), "dshm")
    expect(
        "/dev/shm volume", volumes.get("dshm", {}).get("emptyDir"), {"medium": "Memory", "sizeLimit": "64Gi"}
    )
    (init,) = pod["initContainers"]
    expect("init container image", init.get("image"), IMAGE)
    env = pod_environment(container, index=0, job_name=JOB_NAME)
    expected_env = {
        "VITADAPTER_GPUS": str(gpus),
        "VITADAPTER_NODES": str(nodes),
        "MLFLOW_TRACKING_URI": MLFLOW_URI,
        "PREFECT_LOGGING_EXTRA_LOGGERS": "pipelines,models,data",
        "PREFECT__FLOW_RUN_ID": flow_run_id,
        "PREFECT_API_URL": url,
        "NCCL_DEBUG": "WARN",
        "NODE_RANK": "0",
        "MASTER_ADDR": f"{JOB_NAME}-0.vitadapter-torchrun",
        "MASTER_PORT": "29500",
    }
    for name, value in expected_env.items():
        expect(f"env {name}", env.get(name), value)
    if problems:
        raise ManifestError(problems)
    return env


def test_template_file_is_prefects_default_plus_ours() -> None:
    tool = _tool()
    assert TEMPLATE_FILE.read_text() == tool.render(), "run: python tools/k8s_job_template.py --write"
    template = json.loads(TEMPLATE_FILE.read_text())
    default = tool.prefect_default()
    declared = set(template["variables"]["properties"])
    assert set(default["variables"]["properties"]) <= declared  # Prefect's own variables all stay
    text = json.dumps(template["job_configuration"])
    used = {name for name in declared if f"{{{{ {name} }}}}" in text}
    # `env` has no placeholder: the worker merges it over job_configuration.env (a dict here)
    assert used | {"env"} == declared, f"declared but never used: {sorted(declared - used - {'env'})}"
    assert isinstance(template["job_configuration"]["env"], dict)
    assert template["variables"]["required"] == ["image"]


def test_cluster_manifests_are_valid_and_match_the_pools_defaults() -> None:
    documents = {doc["kind"]: doc for doc in yaml.safe_load_all(CLUSTER_FILE.read_text())}
    assert sorted(documents) == ["Namespace", "PersistentVolumeClaim", "Service"]
    for document in documents.values():
        check_document(document)
    template = json.loads(TEMPLATE_FILE.read_text())
    defaults = {name: value.get("default") for name, value in template["variables"]["properties"].items()}
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]
    service, claim = documents["Service"], documents["PersistentVolumeClaim"]
    assert documents["Namespace"]["metadata"]["name"] == defaults["namespace"]
    assert service["metadata"]["namespace"] == claim["metadata"]["namespace"] == defaults["namespace"]
    assert service["metadata"]["name"] == defaults["torchrun_service"]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (port,) = service["spec"]["ports"]
    assert port["port"] == defaults["torchrun_port"] and port["targetPort"] == "c10d"
    assert claim["metadata"]["name"] == defaults["artifacts_claim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # the pods of a multi-node job share it
    broken = copy.deepcopy(service)
    broken["spec"]["publishNotReadyAdresses"] = broken["spec"].pop("publishNotReadyAddresses")
    with pytest.raises(ManifestError, match="publishNotReadyAdresses"):
        check_document(broken)


def test_pool_and_deployments_on_a_real_server(server: Server) -> None:
    pool = api30(server.url, "/work_pools/vitadapter-k8s")
    assert pool["type"] == "kubernetes"
    assert pool["base_job_template"] == json.loads(TEMPLATE_FILE.read_text())
    found = api30(server.url, "/deployments/filter", {"deployments": {"name": {"any_": ["k8s"]}}})
    assert len(found) == 3
    for deployment in found:
        assert deployment["work_pool_name"] == "vitadapter-k8s"
        assert deployment["entrypoint"].startswith("pipelines.orchestration.flows:")  # the installed module
        (step,) = deployment["pull_steps"]
        assert step["prefect.deployments.steps.set_working_directory"] == {"directory": "/opt/vitadapter"}
        variables = deployment["job_variables"]
        assert variables["image"] == IMAGE and variables["mlflow_tracking_uri"] == MLFLOW_URI
        assert (variables["gpus"], variables["nodes"]) == (8, 1)
    # the pool's schema refuses what a job could not run with: an empty image or tracking URI (what
    # VITADAPTER_IMAGE / MLFLOW_TRACKING_URI unset at `prefect deploy` give), GPUs that are not a count,
    # no node
    base = {key: found[0][key] for key in ("flow_id", "work_pool_name")}
    for wrong in ({"image": ""}, {"mlflow_tracking_uri": ""}, {"gpus": "eight"}, {"nodes": 0}, {"gpus": -1}):
        body = {
            **base,
            "name": f"k8s-wrong-{next(iter(wrong))}",
            "job_variables": {**found[0]["job_variables"], **wrong},
        }
        with pytest.raises(urllib.error.HTTPError, match="422"):
            api30(server.url, "/deployments/", body)


@pytest.mark.parametrize(
    ("deployment", "overrides", "gpus"),
    [("experiment/k8s", {"gpus": 4}, 4), ("two-stage/k8s", {}, 8), ("pipeline/k8s", {"gpus": 0}, 0)],
)
def test_rendered_job_of_each_deployment(
    server: Server, monkeypatch: pytest.MonkeyPatch, deployment: str, overrides: dict[str, Any], gpus: int
) -> None:
    parameters = {} if deployment == "pipeline/k8s" else {"run": "ade_stage"}
    manifest, flow_run = _render(server, deployment, overrides, parameters)
    env = expect_job(manifest, gpus=gpus, nodes=1, flow_run_id=str(flow_run.id), url=server.url)
    if gpus > 1:  # the flow's train task launches torchrun with the pod's GPUs, on this node alone
        command = _torchrun(env, "ade_stage", monkeypatch)
        assert f"--nproc-per-node={gpus}" in command and "--standalone" in command, command
    else:  # one process (CPU or one GPU): the stage trains in the flow's own process
        from pipelines.config.params import load_params

        with monkeypatch.context() as patch:
            patch.setenv("VITADAPTER_GPUS", env["VITADAPTER_GPUS"])
            assert load_params(REPO / "params.yaml").run("ade_stage").gpus == gpus


def test_multi_node_job_is_an_indexed_job_with_pod_zero_as_rendezvous(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest, flow_run = _render(server, "two-stage/k8s", {"nodes": 2, "gpus": 8}, {"run": "ade_stage"})
    expect_job(manifest, gpus=8, nodes=2, flow_run_id=str(flow_run.id), url=server.url)
    (container,) = manifest["spec"]["template"]["spec"]["containers"]
    commands = []
    for index in (0, 1):
        env = pod_environment(container, index=index, job_name=JOB_NAME)
        assert env["NODE_RANK"] == str(index) and env["PREFECT__FLOW_RUN_ID"] == str(flow_run.id)
        commands.append(_torchrun(env, "ade_stage", monkeypatch))
    for index, command in enumerate(commands):  # the same launch, each pod with its own rank
        assert "--nproc-per-node=8" in command and "--nnodes=2" in command, command
        assert f"--node-rank={index}" in command, command
        assert f"--rdzv-endpoint={JOB_NAME}-0.vitadapter-torchrun:29500" in command, command
    assert [c for c in commands[0] if "node-rank" not in c] == [
        c for c in commands[1] if "node-rank" not in c
    ]


def _broken_pool(server: Server, name: str, change) -> None:
    """A pool from a copy of the committed template with ``change`` made to its job configuration.

    Raises:
        urllib.error.HTTPError: the server refused the template.
    """
    template = json.loads(TEMPLATE_FILE.read_text())
    change(template["job_configuration"])
    api30(server.url, "/work_pools/", {"name": name, "type": "kubernetes", "base_job_template": template})


def _container(configuration: dict[str, Any]) -> dict[str, Any]:
    return configuration["job_manifest"]["spec"]["template"]["spec"]["containers"][0]


def _render_broken(server: Server, pool: str) -> tuple[dict[str, Any], Any]:
    """A deployment of the experiment flow in ``pool`` (as prefect.yaml's), and a flow run's manifest."""
    good = api30(server.url, "/deployments/filter", {"deployments": {"name": {"any_": ["k8s"]}}})[0]
    body = {
        "name": pool,
        "flow_id": good["flow_id"],
        "work_pool_name": pool,
        "job_variables": good["job_variables"],
        "entrypoint": good["entrypoint"],
        "pull_steps": good["pull_steps"],
    }
    api30(server.url, "/deployments/", body)
    flow = api30(server.url, f"/flows/{good['flow_id']}")
    return _render(server, f"{flow['name']}/{pool}", {}, {"run": "ade_stage"})


BROKEN = {
    # a GPU limit that differs from its request
    "limit-not-request": (
        lambda c: _container(c)["resources"]["limits"].update({"nvidia.com/gpu": 1}),
        "nvidia.com/gpu request '8' differs from its limit '1'",
    ),
    # a declared variable in the wrong place: the limit follows nodes
    "wrong-variable": (
        lambda c: _container(c)["resources"]["limits"].update({"nvidia.com/gpu": "{{ nodes }}"}),
        "differs from its limit '1'",
    ),
    # a typo in a field name: Kubernetes would drop it and the pod would mount nothing
    "field-typo": (
        lambda c: _container(c).update({"volumeMount": _container(c).pop("volumeMounts")}),
        "volumeMount",
    ),
    # an environment value rendered as a number (the API wants text)
    "env-number": (
        lambda c: _container(c)["env"].append({"name": "RDZV_PORT", "value": "{{ torchrun_port }}"}),
        "env.*valid string",
    ),
    # a $(VAR) reference to a variable defined nowhere before it: the rendezvous address would be wrong
    "env-reference": (
        lambda c: _container(c)["env"].insert(0, _container(c)["env"].pop(-1)),
        r"\$\(VITADAPTER_JOB_NAME\) is not an earlier variable",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_template_fails_the_checks(server: Server, case: str) -> None:
    change, message = BROKEN[case]
    pool = f"broken-{case}"
    _broken_pool(server, pool, change)  # the server accepts each of these: only the checks see them
    manifest, flow_run = _render_broken(server, pool)
    with pytest.raises(ManifestError, match=message):
        expect_job(manifest, gpus=8, nodes=1, flow_run_id=str(flow_run.id), url=server.url)


def test_a_typo_in_a_variable_name_is_refused_by_the_server(server: Server) -> None:
    def typo(configuration: dict[str, Any]) -> None:
        _container(configuration)["resources"]["limits"]["nvidia.com/gpu"] = "{{ gpu }}"

    with pytest.raises(urllib.error.HTTPError, match="422") as refused:
        _broken_pool(server, "broken-typo", typo)
    body = refused.value.read().decode()
    assert "undeclared" in body and "gpu" in body, body
