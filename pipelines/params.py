"""``params.yaml``: the pipeline's run-level knobs, loaded strictly into frozen dataclasses.

Architecture and recipes live in the zoo; ``params.yaml`` says which zoo entries to run, on which
data, for how long, on how many GPUs, and where things go. Every key is checked: an unknown key, a
wrong type or an unknown zoo entry / run name is an error naming it (with its path in the file).

Layout::

    paths:    {data, runs, weights, metrics, reports}       # folders (DVC outputs under artifacts/)
    tracking: {uri, experiment, reference_experiment, ...}   # MLflow
    datasets: {<dataset>: {source: synthetic|raw, ...}}      # what `prepare` builds
    runs:     {<run>: {config, overrides, init_from, train: {...}, eval: {...}, gpus}}
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

import models

DatasetName = Literal["ade20k", "coco_stuff164k", "pascal_context_59"]
DEFAULT_PARAMS = Path("params.yaml")


class ParamsError(ValueError):
    """params.yaml is invalid; the message names the file and the key."""


@dataclass(frozen=True)
class Paths:
    """Folders of the pipeline's outputs (relative to the repository root)."""

    data: str = "artifacts/data"
    runs: str = "artifacts/runs"
    weights: str = "artifacts/pretrained"
    metrics: str = "metrics"
    reports: str = "artifacts/reports"
    # where MLflow records go when the tracking server is unreachable (outside every DVC output)
    tracking_fallback: str = "artifacts/mlflow-fallback"


@dataclass(frozen=True)
class Tracking:
    """MLflow settings.

    Attributes:
        uri: tracking URI (``sqlite:///mlflow.db`` locally; ``http://host:5000`` for a server); the
            ``MLFLOW_TRACKING_URI`` environment variable, when set, takes precedence (deployments).
        experiment: experiment of the runs.
        reference_experiment: experiment holding the published rows.
        timeout_s: HTTP timeout of one tracking call (an unreachable server never stops training).
        max_retries: HTTP retries of one tracking call.
        enabled: log to MLflow at all.
    """

    uri: str = "sqlite:///mlflow.db"
    experiment: str = "vitadapter"
    reference_experiment: str = "vitadapter-reference"
    timeout_s: int = 10
    max_retries: int = 1
    enabled: bool = True


@dataclass(frozen=True)
class DatasetParams:
    """One dataset to prepare.

    Attributes:
        source: ``synthetic`` (a twin in the official format) or ``raw`` (the official download in ``raw``).
        raw: folder of the official download (``source: raw``).
        num_train, num_val, seed, min_size, max_size, num_classes_used: the synthetic twin.
        samples_per_shard: shard size.
    """

    source: Literal["synthetic", "raw"] = "synthetic"
    raw: str | None = None
    num_train: int = 16
    num_val: int = 4
    seed: int = 0
    min_size: int = 256
    max_size: int = 512
    num_classes_used: int | None = None
    samples_per_shard: int = 1000


@dataclass(frozen=True)
class TrainParams:
    """Run-level training knobs (None: the recipe's value)."""

    max_iters: int | None = None
    batch_size: int | None = None
    global_batch: int | None = None
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    eval_interval: int | None = None
    checkpoint_interval: int | None = None
    log_interval: int | None = None
    keep_checkpoints: int = 1
    seed: int = 0
    deterministic: bool = False
    num_workers: int = 2
    pretrained: str = "auto"
    eval_limit: int | None = None


@dataclass(frozen=True)
class EvalParams:
    """Evaluation of a finished run: which modes, on how many images, with which checkpoint."""

    modes: tuple[Literal["ss", "ms"], ...] = ("ss", "ms")
    limit: int | None = None
    checkpoint: Literal["best", "last"] = "best"
    # recipe: fp16 autocast on CUDA for the configs the reference evaluated that way (recipes.md 2.6)
    precision: Literal["recipe", "fp32", "bf16", "fp16"] = "recipe"
    batch_windows: int = 4


@dataclass(frozen=True)
class RunParams:
    """One training run of a zoo entry.

    Attributes:
        config: zoo entry.
        overrides: zoo overrides (architecture or recipe), e.g. a tiny model for the demo.
        init_from: the run whose checkpoint starts this one (strategy 2), ``auto`` (the recipe's stage
            run or released file), ``none``, or a checkpoint path.
        gpus: GPUs per node for ``torchrun`` (0: one CPU process).
        nodes: nodes (with ``torchrun --nnodes``).
    """

    config: str
    overrides: dict[str, Any] = field(default_factory=dict)
    init_from: str = "auto"
    train: TrainParams = field(default_factory=TrainParams)
    eval: EvalParams = field(default_factory=EvalParams)
    gpus: int = 0
    nodes: int = 1

    @property
    def dataset(self) -> str:
        return models.get_config(self.config).data.dataset


@dataclass(frozen=True)
class Params:
    """The whole params.yaml."""

    paths: Paths = field(default_factory=Paths)
    tracking: Tracking = field(default_factory=Tracking)
    datasets: dict[str, DatasetParams] = field(default_factory=dict)
    runs: dict[str, RunParams] = field(default_factory=dict)

    def run(self, name: str) -> RunParams:
        try:
            return self.runs[name]
        except KeyError:
            raise ParamsError(
                f"unknown run {name!r}; params.yaml defines: {', '.join(self.runs) or 'none'}"
            ) from None

    def run_order(self) -> list[str]:
        """Run names with every run after the run it starts from."""
        ordered: list[str] = []
        visiting: set[str] = set()

        def visit(name: str) -> None:
            if name in ordered:
                return
            if name in visiting:
                raise ParamsError(f"runs: init_from forms a cycle through {name!r}")
            visiting.add(name)
            parent = self.runs[name].init_from
            if parent in self.runs:
                visit(parent)
            ordered.append(name)

        for name in self.runs:
            visit(name)
        return ordered

    def run_dir(self, name: str) -> Path:
        return Path(self.paths.runs) / name

    def data_dir(self, dataset: str) -> Path:
        return Path(self.paths.data) / dataset

    def metrics_dir(self, name: str) -> Path:
        return Path(self.paths.metrics) / name


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _convert(value: Any, annotation: Any, where: str) -> Any:
    """Check ``value`` against ``annotation`` (dataclass, Literal, Optional, tuple, dict, scalars)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(value, option, where)
            except ParamsError as err:
                errors.append(str(err))
        raise ParamsError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {annotation}")
    if origin is Literal:
        if value not in args:
            raise ParamsError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, where)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ParamsError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{where}: expected a mapping, got {type(value).__name__}")
        return {str(k): _convert(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if annotation is Any:
        return value
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is int and isinstance(value, bool):
        raise ParamsError(f"{where}: expected int, got bool {value!r}")
    if isinstance(annotation, type) and not isinstance(value, annotation):
        raise ParamsError(f"{where}: expected {_type_name(annotation)}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type, raw: Any, where: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{where}: expected a mapping, got {type(raw).__name__} {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ParamsError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(names))})")
    values = {k: _convert(v, hints[k], f"{where}.{k}" if where else k) for k, v in raw.items()}
    try:
        return cls(**values)
    except TypeError as err:  # a required key is missing
        raise ParamsError(f"{where or 'params'}: {err}") from err


def parse_params(raw: Any, *, source: str = "params.yaml") -> Params:
    """Validate a loaded YAML document into :class:`Params`."""
    try:
        params: Params = _build(Params, raw, "")
    except ParamsError as err:
        raise ParamsError(f"{source}: {err}") from None
    for name, dataset in params.datasets.items():
        if name not in typing.get_args(DatasetName):
            raise ParamsError(
                f"{source}: datasets.{name}: unknown dataset (known: {', '.join(typing.get_args(DatasetName))})"
            )
        if dataset.source == "raw" and not dataset.raw:
            raise ParamsError(
                f"{source}: datasets.{name}: source 'raw' needs raw: <folder of the official download>"
            )
    for name, run in params.runs.items():
        try:
            models.get_config(run.config, **run.overrides)
        except KeyError as err:
            raise ParamsError(f"{source}: runs.{name}.config: {err.args[0]}") from None
        except ValueError as err:
            raise ParamsError(f"{source}: runs.{name}.overrides: {err}") from None
        if run.dataset not in params.datasets and run.eval.modes:
            raise ParamsError(
                f"{source}: runs.{name} trains on {run.dataset!r}, which datasets does not list "
                f"(it lists: {', '.join(params.datasets) or 'none'})"
            )
        if run.gpus < 0 or run.nodes < 1:
            raise ParamsError(f"{source}: runs.{name}: gpus must be >= 0 and nodes >= 1")
    params.run_order()
    env_uri = os.environ.get("MLFLOW_TRACKING_URI")
    if env_uri:
        params = dataclasses.replace(params, tracking=dataclasses.replace(params.tracking, uri=env_uri))
    return params


def load_params(path: str | os.PathLike[str] = DEFAULT_PARAMS) -> Params:
    """Read and validate params.yaml.

    Raises:
        FileNotFoundError: no such file.
        ParamsError: invalid YAML or content, naming the key.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"params file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from err
    return parse_params(raw, source=str(path))
