"""``params.yaml``: the pipeline's run-level knobs, loaded strictly into frozen dataclasses.

Architecture and recipes live in the zoo; ``params.yaml`` says which zoo entries to run, on which
data, for how long, on how many GPUs, and where things go. Every key is checked: an unknown key, a
wrong type or an unknown zoo entry / run name is an error naming it (with its path in the file).

Layout::

    paths:    {data, runs, weights, metrics, reports}       # folders (DVC outputs under artifacts/)
    tracking: {uri, experiment, reference_experiment, ...}   # MLflow
    datasets: {<dataset>: {source: synthetic|raw|card, ...}} # what `prepare` builds (card: your own data)
    runs:     {<run>: {config, data, overrides, init_from, train: {...}, eval: {...}, gpus}}
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

import models
import models.zoo
from models.config import SegmentorConfig
from pipelines.config.knobs import TrainParams, weight_defining_knobs
from pipelines.config.strict import ParamsError, build

DatasetName = Literal["ade20k", "coco_stuff164k", "pascal_context_59"]
# the keys of a run entry that define its training (with the weight-defining knobs of ``train``);
# ``eval`` and the other ``train`` knobs never make a trained run stale
TRAINING_KEYS = ("config", "data", "preset", "overrides", "init_from", "gpus", "nodes")
DEFAULT_PARAMS = Path("params.yaml")
# A Kubernetes pod's size (deploy/kubernetes/: the work pool's job variables `gpus` and `nodes` set these in
# every pod), which decides the torchrun launch of each run there; the params file's values are the
# local ones. Read like MLFLOW_TRACKING_URI, so the flow and torchrun's processes load the same runs.
LAUNCH_ENVS = {"gpus": ("VITADAPTER_GPUS", 0), "nodes": ("VITADAPTER_NODES", 1)}

log = logging.getLogger(__name__)
_announced: set[tuple[str, str, int]] = set()


@dataclass(frozen=True)
class Paths:
    """Folders of the pipeline's outputs (relative to the repository root): the only place their defaults live.

    Attributes:
        data: prepared shards and synthetic twins.
        runs: run folders.
        weights: pretrained and released files.
        metrics: small JSON metrics (git-tracked).
        reports: the comparison report, per-class tables, overlays.
        tracking_fallback: where MLflow records go when the tracking server is unreachable.
        plots: the offline training-curve page.
        prefect_home: the Prefect home of flows run without a server.
        prefect_results: persisted Prefect task and flow results.
    """

    data: str = "artifacts/data"
    runs: str = "artifacts/runs"
    weights: str = "artifacts/pretrained"
    metrics: str = "metrics"
    reports: str = "artifacts/reports"
    tracking_fallback: str = "artifacts/mlflow-fallback"
    plots: str = "artifacts/plots"
    prefect_home: str = "artifacts/prefect-home"
    prefect_results: str = "artifacts/prefect/results"


DEFAULT_PATHS = Paths()


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
        source: ``synthetic`` (a twin in the official format), ``raw`` (the official download in ``raw``) or
            ``card`` (your own data, described by the dataset card ``card``; the key is the card's name).
        raw: folder of the official download (``source: raw``).
        card: the dataset card file (``source: card``), relative to the repository root.
        skip_unpaired: ``source: card``: skip (and record) files without a partner instead of failing.
        num_train, num_val, seed, min_size, max_size, num_classes_used: the synthetic twin.
        samples_per_shard: shard size.
    """

    source: Literal["synthetic", "raw", "card"] = "synthetic"
    raw: str | None = None
    card: str | None = None
    skip_unpaired: bool = False
    num_train: int = 16
    num_val: int = 4
    seed: int = 0
    min_size: int = 256
    max_size: int = 512
    num_classes_used: int | None = None
    samples_per_shard: int = 1000


@dataclass(frozen=True)
class EvalParams:
    """Evaluation of a finished run: which modes, on how many images, with which checkpoint."""

    modes: tuple[Literal["ss", "ms"], ...] = ("ss", "ms")
    limit: int | None = None
    checkpoint: Literal["best", "last"] = "best"
    # recipe: fp16 autocast on CUDA for the configs the reference evaluated that way (docs/reference.md §R2.6)
    precision: Literal["recipe", "fp32", "bf16", "fp16"] = "recipe"
    batch_windows: int = 4
    # TF32 convolutions and matmuls on CUDA, as the reference ran (pipelines/engine/precision.py); no-op on CPU
    tf32: bool = True


@dataclass(frozen=True)
class RunParams:
    """One training run of a zoo entry.

    Attributes:
        config: zoo entry.
        data: the dataset (a name under ``datasets``) the run trains and evaluates on; None: the entry's own.
            A dataset card's name builds the entry with the card's classes (``data.dataset`` and
            ``num_classes`` are then set by the card, in ``overrides``).
        preset: named overrides applied first (``tiny``: the demo's CPU-sized model of the same structure).
        overrides: zoo overrides by dotted path (``optimizer.lr: 0.002``; the aliases of
            :data:`models.overrides.ALIASES` too), checked like ``--set``.
        init_from: the run whose checkpoint starts this one (strategy 2), ``auto`` (the recipe's stage
            run or released file), ``none``, or a checkpoint path.
        gpus: GPUs per node for ``torchrun`` (0: one CPU process); ``VITADAPTER_GPUS``, when set (a
            Kubernetes pod's ``gpus``), takes precedence for every run.
        nodes: nodes (with ``torchrun --nnodes``); ``VITADAPTER_NODES``, when set, takes precedence.
    """

    config: str
    data: str | None = None
    preset: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    init_from: str = "auto"
    train: TrainParams = field(default_factory=TrainParams)
    eval: EvalParams = field(default_factory=EvalParams)
    gpus: int = 0
    nodes: int = 1

    def model_config(self) -> SegmentorConfig:
        """The zoo entry with this run's preset and overrides."""
        return models.get_config(self.config, self.overrides, preset=self.preset)

    def model_overrides(self) -> dict[str, Any]:
        """Preset and overrides as one ``{full path: value}`` (what checkpoints record)."""
        return models.zoo.resolved_overrides(self.config, self.overrides, preset=self.preset)

    @property
    def dataset(self) -> str:
        """The dataset the run trains and evaluates on."""
        return self.data or self.model_config().data.dataset


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

    def chain_of(self, name: str) -> list[str]:
        """The runs that ``name`` starts from, first to last, ending with ``name``."""
        chain = [self.run(name) and name]
        while self.runs[chain[0]].init_from in self.runs:
            chain.insert(0, self.runs[chain[0]].init_from)
        return chain

    def training_definition(self, name: str) -> dict[str, Any]:
        """Everything that defines the trained weights of run ``name``, and nothing else.

        The keys :data:`TRAINING_KEYS` of its entry (overrides resolved with the preset), its
        weight-defining knobs (:func:`pipelines.config.knobs.weight_defining_knobs`) and, for a run that
        starts from another run, that run's definition. The run signature, DVC's parameter dependencies of
        the train stage and Prefect's cache key of the train task all follow this one definition, so an
        evaluation setting, a log interval or the number of loader workers never invalidates training.
        """
        run = self.run(name)
        definition: dict[str, Any] = {
            "config": run.config,
            "overrides": run.model_overrides(),
            "init_from": run.init_from,
            "gpus": run.gpus,
            "nodes": run.nodes,
            "train": {key: getattr(run.train, key) for key in weight_defining_knobs()},
        }
        if run.data is not None:  # a dataset card: another card (or an edited one) is another training
            definition["data"] = run.data
            card = self.datasets[run.data].card if run.data in self.datasets else None
            if card is not None and Path(card).is_file():
                definition["card_sha256"] = hashlib.sha256(Path(card).read_bytes()).hexdigest()
        if run.init_from in self.runs:
            definition["init_from_run"] = self.training_definition(run.init_from)
        return definition

    def run_dir(self, name: str) -> Path:
        return Path(self.paths.runs) / name

    def data_dir(self, dataset: str) -> Path:
        return Path(self.paths.data) / dataset

    def metrics_dir(self, name: str) -> Path:
        return Path(self.paths.metrics) / name


def parse_params(raw: Any, *, source: str = "params.yaml") -> Params:
    """Validate a loaded YAML document into :class:`Params`."""
    try:
        params: Params = build(Params, raw, "")
    except ParamsError as err:
        raise ParamsError(f"{source}: {err}") from None
    for name, dataset in params.datasets.items():
        _check_dataset(name, dataset, source)
    runs = {}
    for name, run in params.runs.items():
        runs[name] = _with_data(name, run, params, source)
    params = dataclasses.replace(params, runs=runs)
    for name, run in params.runs.items():
        try:
            models.get_config(run.config)
        except KeyError as err:
            raise ParamsError(f"{source}: runs.{name}.config: {err.args[0]}") from None
        try:
            run.model_config()
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
    return _launch_from_environment(params, source)


def _launch_from_environment(params: Params, source: str) -> Params:
    """Every run's ``gpus`` / ``nodes`` from :data:`LAUNCH_ENVS` where set (a Kubernetes pod's size).

    Raises:
        ParamsError: a set variable is not an integer at or above its minimum, naming it.
    """
    launch: dict[str, int] = {}
    for key, (name, minimum) in LAUNCH_ENVS.items():
        text = os.environ.get(name, "").strip()
        if not text:
            continue
        try:
            value = int(text)
        except ValueError:
            raise ParamsError(f"{name}={text!r} (the pod's {key}): not an integer") from None
        if value < minimum:
            raise ParamsError(f"{name}={value} (the pod's {key}): must be >= {minimum}")
        launch[key] = value
    if not launch:
        return params
    for name, run in params.runs.items():
        for key, value in launch.items():
            if getattr(run, key) != value and (name, key, value) not in _announced:
                _announced.add((name, key, value))  # once per process, not at every load
                log.warning(
                    "%s: runs.%s.%s is %s; the pod's %s=%s decides (%s)",
                    source, name, key, getattr(run, key), LAUNCH_ENVS[key][0], value, key,
                )  # fmt: skip
    runs = {name: dataclasses.replace(run, **launch) for name, run in params.runs.items()}
    return dataclasses.replace(params, runs=runs)


def _check_dataset(name: str, dataset: DatasetParams, source: str) -> None:
    """A built-in dataset (a twin or the official download), or a card whose name is the key (put in use)."""
    if dataset.source == "card":
        from data.cards import CardError
        from pipelines.config.datasets import use_card_file

        if not dataset.card:
            raise ParamsError(f"{source}: datasets.{name}: source 'card' needs card: <the dataset card file>")
        try:
            info = use_card_file(dataset.card)
        except (CardError, FileNotFoundError) as err:
            raise ParamsError(f"{source}: datasets.{name}.card: {err}") from None
        if info.name != name:
            raise ParamsError(
                f"{source}: datasets.{name}: the card {dataset.card} is named {info.name!r}: use that name as the key"
            )
        return
    if name not in typing.get_args(DatasetName):
        raise ParamsError(
            f"{source}: datasets.{name}: unknown dataset (known: {', '.join(typing.get_args(DatasetName))}; "
            "your own data: source: card, card: <the card file>)"
        )
    if dataset.card is not None or dataset.skip_unpaired:
        raise ParamsError(f"{source}: datasets.{name}: card and skip_unpaired apply to source: card")
    if dataset.source == "raw" and not dataset.raw:
        raise ParamsError(
            f"{source}: datasets.{name}: source 'raw' needs raw: <folder of the official download>"
        )


def _with_data(name: str, run: RunParams, params: Params, source: str) -> RunParams:
    """``run`` with the overrides of its ``data`` (a dataset card: its name and classes) merged in."""
    if run.data is None:
        return run
    from data.catalog import get_dataset
    from pipelines.config.datasets import retarget

    if run.data not in params.datasets:
        raise ParamsError(
            f"{source}: runs.{name}.data: {run.data!r} is not listed under datasets "
            f"(it lists: {', '.join(params.datasets) or 'none'})"
        )
    try:
        entry = models.get_config(run.config)
    except KeyError as err:
        raise ParamsError(f"{source}: runs.{name}.config: {err.args[0]}") from None
    info = get_dataset(run.data)
    if not info.own:
        if run.data != entry.data.dataset:
            raise ParamsError(
                f"{source}: runs.{name}.data: {run.config} is an entry of {entry.data.dataset}; for "
                f"{run.data} use one of its entries (`vitadapter configs list`) or a dataset card"
            )
        return run
    try:
        overrides = retarget(run.config, models.zoo.resolved_overrides(run.config, run.overrides), info)
    except ValueError as err:
        raise ParamsError(f"{source}: runs.{name}.overrides: {err}") from None
    return dataclasses.replace(run, overrides=overrides)


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
