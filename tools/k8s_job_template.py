"""The Kubernetes work pool's base job template, generated from Prefect's default for ``--type kubernetes``.

``deploy/kubernetes/base-job-template.json`` is this script's output (a test keeps them in step, so a new
prefect-kubernetes default shows up as a diff to review). Prefect's default
(``prefect work-pool get-default-base-job-template --type kubernetes``) plus:

* variables ``gpus`` (``nvidia.com/gpu`` requested = limited, per pod), ``nodes`` (pods of an Indexed
  Job: one per node), ``artifacts_claim`` (the persistent volume claim mounted on
  ``/opt/vitadapter/artifacts``, its ``metrics/`` folder on ``/opt/vitadapter/metrics``), ``shm_size``
  (``/dev/shm``, a memory-backed volume for the data loader's workers), ``mlflow_tracking_uri`` and
  ``forward_loggers`` (``MLFLOW_TRACKING_URI`` and ``PREFECT_LOGGING_EXTRA_LOGGERS`` in the pods),
  ``torchrun_service`` and ``torchrun_port`` (the headless Service of ``torchrun-service.yaml`` and the
  c10d rendezvous port on pod 0);
* requests for CPU and memory by default, a required non-empty ``image``, the namespace ``vitadapter``;
* the pods: the image's non-root user, ``vitadapter flow node -- <the worker's command>`` (node 0 runs
  the flow run, the others join its torchrun launches: ``pipelines/orchestration/nodes.py``), with
  ``NODE_RANK`` from the completion index, ``MASTER_ADDR`` = pod 0 under the Service, ``VITADAPTER_GPUS``
  and ``VITADAPTER_NODES`` (which decide the training's torchrun launch).

Usage (prefect-kubernetes installed: the test extras or ``pip install prefect-kubernetes==0.8.0``)::

    .venv/bin/python tools/k8s_job_template.py --write   # regenerate deploy/kubernetes/base-job-template.json
    .venv/bin/python tools/k8s_job_template.py --check   # exit status 1 when the file differs
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TEMPLATE_FILE = REPO / "deploy" / "kubernetes" / "base-job-template.json"
IMAGE_UID = 1000  # the Dockerfile's user
WORKDIR = "/opt/vitadapter"
# a Kubernetes resource quantity ("8", "500m", "64Gi", "1.5")
QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"

VARIABLES: dict[str, dict[str, Any]] = {
    "gpus": {
        "title": "GPUs per pod",
        "description": "nvidia.com/gpu requested and limited per pod (one pod per node); every run's torchrun "
        "starts this many processes per pod (VITADAPTER_GPUS). 0: one CPU process.",
        "type": "integer",
        "minimum": 0,
        "default": 1,
    },
    "nodes": {
        "title": "Nodes",
        "description": "Pods of the Indexed Job, one per node (VITADAPTER_NODES). Above 1, pod 0 runs the flow "
        "run and is the c10d rendezvous endpoint; the other pods join its torchrun launches.",
        "type": "integer",
        "minimum": 1,
        "default": 1,
    },
    "artifacts_claim": {
        "title": "Artifacts volume claim",
        "description": f"PersistentVolumeClaim mounted on {WORKDIR}/artifacts (datasets, weights, runs, reports) "
        f"and, its metrics/ folder, on {WORKDIR}/metrics. ReadWriteMany when nodes > 1.",
        "type": "string",
        "pattern": DNS_LABEL,
        "default": "vitadapter-artifacts",
    },
    "shm_size": {
        "title": "/dev/shm size",
        "description": "Size of the memory-backed /dev/shm (the data loader's worker processes share batches "
        "through it; the container runtime's default is 64 MB).",
        "type": "string",
        "pattern": QUANTITY,
        "default": "16Gi",
    },
    "mlflow_tracking_uri": {
        "title": "MLflow tracking URI",
        "description": "MLFLOW_TRACKING_URI in the pods: where every run is logged (it takes precedence over "
        "the params file's tracking.uri). The default keeps a sqlite store on the artifacts volume.",
        "type": "string",
        "minLength": 1,
        "default": f"sqlite:///{WORKDIR}/artifacts/mlflow.db",
    },
    "forward_loggers": {
        "title": "Loggers forwarded to the flow run's log",
        "description": "PREFECT_LOGGING_EXTRA_LOGGERS in the pods: the project's loggers whose records appear "
        "in the flow run's log in the Prefect UI.",
        "type": "string",
        "default": "pipelines,models,data",
    },
    "torchrun_service": {
        "title": "torchrun headless Service",
        "description": "The headless Service (deploy/kubernetes/torchrun-service.yaml) under which pod 0 has "
        "the DNS name <job>-0.<service>: the rendezvous endpoint of multi-node runs.",
        "type": "string",
        "pattern": DNS_LABEL,
        "default": "vitadapter-torchrun",
    },
    "torchrun_port": {
        "title": "torchrun rendezvous port",
        "description": "Port of the c10d rendezvous on pod 0 (MASTER_PORT).",
        "type": "integer",
        "minimum": 1,
        "maximum": 65535,
        "default": 29500,
    },
}
# Prefect's own variables whose defaults change: requests sized for a training pod, a non-empty image
DEFAULTS = {"cpu_request": "8", "memory_request": "64Gi", "namespace": "vitadapter"}

# the pods' environment beyond the worker's (job_configuration.env: the `env` job variable is merged over it)
ENV = {
    "VITADAPTER_GPUS": "{{ gpus }}",
    "VITADAPTER_NODES": "{{ nodes }}",
    "MASTER_PORT": "{{ torchrun_port }}",
    "MLFLOW_TRACKING_URI": "{{ mlflow_tracking_uri }}",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "{{ forward_loggers }}",
}
# entries the Kubernetes API fills in each pod (the worker appends them after the environment above)
POD_ENV = [
    {
        "name": "NODE_RANK",
        "valueFrom": {
            "fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}
        },
    },
    {
        "name": "VITADAPTER_JOB_NAME",
        "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['batch.kubernetes.io/job-name']"}},
    },
    # an Indexed Job's pod i is named <job>-<i>; under the Service (the pod's subdomain) it resolves
    {"name": "MASTER_ADDR", "value": "$(VITADAPTER_JOB_NAME)-0.{{ torchrun_service }}"},
]


def template(default: dict[str, Any]) -> dict[str, Any]:
    """The vitadapter base job template from Prefect's ``default`` (see the module docstring)."""
    result = copy.deepcopy(default)
    properties = result["variables"]["properties"]
    for name, value in DEFAULTS.items():
        properties[name]["default"] = value
    properties["image"] = {
        **{k: v for k, v in properties["image"].items() if k not in ("anyOf", "default", "examples")},
        "type": "string",
        "minLength": 1,
        "description": "The vitadapter image (the repository's Dockerfile), e.g. registry.example.org/vitadapter:0.1.0.",
    }
    properties.update(copy.deepcopy(VARIABLES))
    result["variables"]["required"] = sorted({*result["variables"].get("required", []), "image"})

    configuration = result["job_configuration"]
    configuration["env"] = dict(ENV)
    job = configuration["job_manifest"]
    spec = job["spec"]
    # one pod per node, each with its completion index; Indexed with 1 completion is the single-node job
    spec.update({"completionMode": "Indexed", "completions": "{{ nodes }}", "parallelism": "{{ nodes }}"})
    pod = spec["template"]["spec"]
    spec["template"]["metadata"] = {"labels": {"vitadapter.io/torchrun": "true"}}  # the Service's selector
    pod["subdomain"] = "{{ torchrun_service }}"
    pod["securityContext"] = {
        "runAsNonRoot": True,
        "runAsUser": IMAGE_UID,
        "runAsGroup": IMAGE_UID,
        "fsGroup": IMAGE_UID,  # the volume's files belong to the image's group
    }
    # The worker requires `parallelism: 1` and `completions: 1` in the *pod* spec (its manifest check);
    # Kubernetes has no such pod fields and drops them: they stay, the job-level ones above count.
    (container,) = pod["containers"]
    container["command"] = ["vitadapter", "flow", "node", "--"]
    container["env"] = copy.deepcopy(POD_ENV)
    resources = container["resources"]
    resources["requests"]["nvidia.com/gpu"] = "{{ gpus }}"
    resources["limits"]["nvidia.com/gpu"] = "{{ gpus }}"  # extended resources: limit = request
    container["ports"] = [{"name": "c10d", "containerPort": "{{ torchrun_port }}", "protocol": "TCP"}]
    container["volumeMounts"] = [
        {"name": "artifacts", "mountPath": f"{WORKDIR}/artifacts"},
        {"name": "artifacts", "mountPath": f"{WORKDIR}/metrics", "subPath": "metrics"},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    # the metrics/ folder of a new volume, made by the image's user (a subPath the kubelet creates is root's)
    pod["initContainers"] = [
        {
            "name": "artifacts-folders",
            "image": "{{ image }}",
            "imagePullPolicy": "{{ image_pull_policy }}",
            "command": ["mkdir", "-p", f"{WORKDIR}/artifacts/metrics"],
            "volumeMounts": [{"name": "artifacts", "mountPath": f"{WORKDIR}/artifacts"}],
        }
    ]
    pod["volumes"] = [
        {"name": "artifacts", "persistentVolumeClaim": {"claimName": "{{ artifacts_claim }}"}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "{{ shm_size }}"}},
    ]
    return result


def prefect_default() -> dict[str, Any]:
    """Prefect's default base job template for ``--type kubernetes`` (prefect-kubernetes' own)."""
    from prefect_kubernetes.worker import KubernetesWorker

    return KubernetesWorker.get_default_base_job_template()


def render() -> str:
    return json.dumps(template(prefect_default()), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The Kubernetes work pool's base job template (see --help).")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", action="store_true", help=f"write {TEMPLATE_FILE.relative_to(REPO)}")
    action.add_argument("--check", action="store_true", help="exit status 1 when the file differs")
    action.add_argument("--print", action="store_true", help="print the template")
    args = parser.parse_args(argv)
    text = render()
    if args.print:
        sys.stdout.write(text)
    elif args.check:
        if not TEMPLATE_FILE.is_file() or TEMPLATE_FILE.read_text() != text:
            sys.stderr.write(
                f"{TEMPLATE_FILE.relative_to(REPO)} is not what {Path(__file__).name} makes: run --write\n"
            )
            return 1
    else:
        TEMPLATE_FILE.parent.mkdir(parents=True, exist_ok=True)
        partial = TEMPLATE_FILE.with_suffix(".json.partial")  # whole or not at all
        partial.write_text(text)
        os.replace(partial, TEMPLATE_FILE)
        sys.stdout.write(f"wrote {TEMPLATE_FILE.relative_to(REPO)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
