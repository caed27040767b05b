"""Kubernetes manifests checked as the API server checks them, with the kubernetes client's models.

The client's models (kubernetes 37: pydantic, ``extra="forbid"``, strict types) validated with
``model_validate`` reject an unknown field (a typo'd name) and a wrong type; ``from_dict`` and
``ApiClient.deserialize`` would drop an unknown key silently, so they are not used. On top of the
schema, the API server's own rules that a template can break: names, labels, environment variables and
their ``$(VAR)`` references, volume mounts, resource quantities, extended resources (GPUs: integer,
request = limit). Every problem is collected; :class:`ManifestError` names them all.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from typing import Any

import pydantic
from kubernetes import client

# a Kubernetes resource quantity (apimachinery's resource.ParseQuantity, decimal and binary suffixes)
QUANTITY = re.compile(
    r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+|m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"
)
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$")
LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9]$")
ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
ENV_REFERENCE = re.compile(r"\$\(([^)]*)\)")
STANDARD_RESOURCES = {"cpu", "memory", "ephemeral-storage"}
# prefect-kubernetes' manifest check demands these in the *pod* spec with value 1 (its default template
# carries them there); PodSpec has no such fields and the API server drops them (its default field
# validation warns): the only fields of a rendered job outside the schema, and nothing else may be
PREFECT_POD_FIELDS = {"completions": 1, "parallelism": 1}


class ManifestError(AssertionError):
    """A manifest the Kubernetes API would reject (or one of this project's own rules broken)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def walk(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every ``(path, value)`` of a nested document."""
    yield path, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from walk(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from walk(item, f"{path}[{index}]")


def _quantities_as_strings(resources: dict[str, Any], path: str, problems: list[str]) -> None:
    """Quantities are int-or-string in the API (the client types them ``str``): numbers become text."""
    for kind in ("limits", "requests"):
        for name, value in (resources.get(kind) or {}).items():
            text = str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value
            if not isinstance(text, str) or not QUANTITY.match(text):
                problems.append(f"{path}.{kind}.{name}: {value!r} is not a resource quantity")
                continue
            resources[kind][name] = text


def schema_problems(document: dict[str, Any], model: type[pydantic.BaseModel]) -> list[str]:
    """Where ``document`` breaks ``model``'s schema (unknown fields, wrong types, missing required ones)."""
    try:
        model.model_validate(document)
    except pydantic.ValidationError as error:
        return [
            f"{'.'.join(str(part) for part in problem['loc'])}: {problem['msg']} (got {problem.get('input')!r})"
            for problem in error.errors()
        ]
    return []


def _check_labels(labels: Any, path: str, problems: list[str]) -> None:
    for key, value in (labels or {}).items():
        name = key.rsplit("/", 1)[-1]
        if not LABEL_NAME.match(name) or ("/" in key and len(key.split("/", 1)[0]) > 253):
            problems.append(f"{path}: label key {key!r} is not valid")
        if not isinstance(value, str) or not LABEL_VALUE.match(value):
            problems.append(f"{path}: label {key}={value!r}: not a valid label value")


def _check_env(env: list[dict[str, Any]], path: str, problems: list[str]) -> None:
    defined: set[str] = set()
    for index, entry in enumerate(env or []):
        name = entry.get("name")
        where = f"{path}[{index}] ({name})"
        if not isinstance(name, str) or not ENV_NAME.match(name):
            problems.append(f"{where}: {name!r} is not a valid environment variable name")
        if name in defined:
            problems.append(f"{where}: defined twice")
        if ("value" in entry) == ("valueFrom" in entry):
            problems.append(f"{where}: needs exactly one of value and valueFrom")
        for reference in ENV_REFERENCE.findall(str(entry.get("value", ""))):
            if reference not in defined:  # Kubernetes leaves $(X) as it is when X is not defined before
                problems.append(f"{where}: $({reference}) is not an earlier variable of the container")
        defined.add(name)


def _check_containers(pod: dict[str, Any], path: str, problems: list[str]) -> None:
    volumes = {volume.get("name") for volume in pod.get("volumes") or []}
    for group in ("initContainers", "containers"):
        names = []
        for index, container in enumerate(pod.get(group) or []):
            where = f"{path}.{group}[{index}]"
            names.append(container.get("name"))
            if not DNS_LABEL.match(str(container.get("name"))):
                problems.append(f"{where}.name: {container.get('name')!r} is not a DNS label")
            _check_env(container.get("env") or [], f"{where}.env", problems)
            for mount in container.get("volumeMounts") or []:
                if mount.get("name") not in volumes:
                    problems.append(f"{where}.volumeMounts: {mount.get('name')!r} is not a volume of the pod")
            resources = container.get("resources") or {}
            requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
            for name in sorted(set(requests) | set(limits)):
                if name in STANDARD_RESOURCES or name.startswith("requests."):
                    continue
                # extended resources (nvidia.com/gpu): whole numbers, and a request must equal the limit
                if name in requests and name in limits and str(requests[name]) != str(limits[name]):
                    problems.append(
                        f"{where}.resources: {name} request {requests[name]!r} differs from its limit {limits[name]!r}"
                    )
                for kind, values in (("requests", requests), ("limits", limits)):
                    if name in values and not re.fullmatch(r"[0-9]+", str(values[name])):
                        problems.append(
                            f"{where}.resources.{kind}.{name}: {values[name]!r} is not a whole number"
                        )
        if len(names) != len(set(names)):
            problems.append(f"{path}.{group}: container names repeat: {names}")
    for index, volume in enumerate(pod.get("volumes") or []):
        if not DNS_LABEL.match(str(volume.get("name"))):
            problems.append(f"{path}.volumes[{index}].name: {volume.get('name')!r} is not a DNS label")


def check_job(manifest: dict[str, Any]) -> client.V1Job:
    """Check a rendered Job manifest (the one the worker would submit).

    Returns:
        The Job as the client's model.

    Raises:
        ManifestError: every problem found.
    """
    problems: list[str] = []
    document = copy.deepcopy(manifest)
    if (document.get("apiVersion"), document.get("kind")) != ("batch/v1", "Job"):
        problems.append(
            f"apiVersion/kind {document.get('apiVersion')}/{document.get('kind')}: expected batch/v1 Job"
        )
    for path, value in walk(document):
        if isinstance(value, str) and ("{{" in value or "}}" in value):
            problems.append(f"{path}: unrendered template placeholder in {value!r}")
    pod = document.get("spec", {}).get("template", {}).get("spec", {})
    for name, value in PREFECT_POD_FIELDS.items():
        if pod.get(name) != value:
            problems.append(
                f"spec.template.spec.{name}: prefect-kubernetes requires {value}, got {pod.get(name)!r}"
            )
        pod.pop(name, None)
    for group in ("initContainers", "containers"):
        for index, container in enumerate(pod.get(group) or []):
            if "resources" in container:
                _quantities_as_strings(
                    container["resources"], f"spec.template.spec.{group}[{index}].resources", problems
                )
    for volume in pod.get("volumes") or []:
        size = (volume.get("emptyDir") or {}).get("sizeLimit")
        if size is not None and not QUANTITY.match(str(size)):
            problems.append(f"volume {volume.get('name')}: sizeLimit {size!r} is not a resource quantity")
    problems += schema_problems(document, client.V1Job)
    metadata = document.get("metadata", {})
    generate = str(metadata.get("generateName", ""))
    if not DNS_LABEL.match(generate.rstrip("-")) or len(generate) > 58:
        problems.append(f"metadata.generateName {generate!r}: not a DNS label prefix (<= 58 characters)")
    _check_labels(metadata.get("labels"), "metadata.labels", problems)
    _check_labels(
        document.get("spec", {}).get("template", {}).get("metadata", {}).get("labels"), "pod labels", problems
    )
    _check_containers(pod, "spec.template.spec", problems)
    if pod.get("restartPolicy") not in ("Never", "OnFailure"):
        problems.append(
            f"spec.template.spec.restartPolicy {pod.get('restartPolicy')!r}: a Job's is Never or OnFailure"
        )
    if problems:
        raise ManifestError(problems)
    return client.V1Job.model_validate(document)


def check_document(document: dict[str, Any]) -> pydantic.BaseModel:
    """Check a plain manifest (Namespace, PersistentVolumeClaim, Service) against its kind's model.

    Raises:
        ManifestError: every problem found.
    """
    models = {
        ("v1", "Namespace"): client.V1Namespace,
        ("v1", "PersistentVolumeClaim"): client.V1PersistentVolumeClaim,
        ("v1", "Service"): client.V1Service,
    }
    key = (document.get("apiVersion"), document.get("kind"))
    if key not in models:
        raise ManifestError([f"apiVersion/kind {key}: not a kind this project writes"])
    document = copy.deepcopy(document)
    problems: list[str] = []
    if key[1] == "PersistentVolumeClaim":
        _quantities_as_strings(document.get("spec", {}).get("resources", {}), "spec.resources", problems)
    problems += schema_problems(document, models[key])
    _check_labels(document.get("metadata", {}).get("labels"), "metadata.labels", problems)
    if not DNS_LABEL.match(str(document.get("metadata", {}).get("name"))):
        problems.append(f"metadata.name {document.get('metadata', {}).get('name')!r}: not a DNS label")
    if problems:
        raise ManifestError(problems)
    return models[key].model_validate(document)


def pod_environment(container: dict[str, Any], *, index: int, job_name: str) -> dict[str, str]:
    """The environment Kubernetes gives ``container`` in pod ``index`` of Indexed Job ``job_name``.

    ``fieldRef`` entries take the pod's completion-index annotation and job-name label; ``$(VAR)`` in a
    value expands to an earlier variable (``$$`` is a literal ``$``), as the kubelet does.
    """
    fields = {
        "metadata.annotations['batch.kubernetes.io/job-completion-index']": str(index),
        "metadata.labels['batch.kubernetes.io/job-name']": job_name,
        "metadata.labels['job-name']": job_name,
    }
    env: dict[str, str] = {}
    for entry in container.get("env") or []:
        if "valueFrom" in entry:
            path = entry["valueFrom"].get("fieldRef", {}).get("fieldPath")
            if path not in fields:
                raise ManifestError(
                    [f"env {entry['name']}: valueFrom {entry['valueFrom']!r} is not a pod field"]
                )
            env[entry["name"]] = fields[path]
            continue

        def expand(match: re.Match[str]) -> str:
            return env.get(match.group(1), match.group(0))

        env[entry["name"]] = ENV_REFERENCE.sub(expand, str(entry["value"]).replace("$$", "\0")).replace(
            "\0", "$"
        )
    return env
