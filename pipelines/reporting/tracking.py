"""MLflow tracking of the pipeline: training and evaluation runs, the two-stage chain, the published table.

The one module that imports mlflow, lazily (with ``tracking.enabled: false`` it never does), always
through an explicit ``MlflowClient`` bound to one URI: no global MLflow state, any calling thread.

What is recorded, and under which names, is :mod:`pipelines.reporting.records`.

An unreachable store never stops training or evaluation: waits are bounded by ``timeout_s`` /
``max_retries``; the first failure warns (naming the URI) and switches the process to
``sqlite:///<fallback_dir>/mlflow-fallback.db``, re-opening the active training run there.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pipelines.config.datasets import NO_PUBLISHED_ROW, has_published_row
from pipelines.config.params import RunParams, Tracking
from pipelines.reporting.mlflow_store import (
    MlflowStore,
    configure_mlflow,
    is_unreachable,
    record_diff,
    refresh_summary,
)
from pipelines.reporting.mlflow_views import (
    SUMMARY_TEXT_TAG,
    DatasetInput,
    reference_view_state,
    run_summary,
    runs_view_state,
    ui_hint,
)
from pipelines.reporting.records import (
    CURVE_ARTIFACT,
    DESCRIPTION_TAG,
    FALLBACK_ARTIFACTS,
    FALLBACK_DB,
    KIND_CHAIN,
    KIND_EVAL,
    KIND_REFERENCE,
    KIND_REPORT,
    KIND_TRAIN,
    PARENT_TAG,
    ROW_TAG_KEYS,
    TAG_CHAIN,
    TAG_FAILED_OVER_FROM,
    TAG_FAILURE,
    TAG_KIND,
    TAG_MODE,
    TAG_PUBLISHED,
    TAG_RUN,
    TAG_ZOO,
    TRAIN_FILES,
    evaluation_metrics,
    final_status,
    flatten_params,
    reference_rows,
    row_tags,
    training_curve,
)

if TYPE_CHECKING:
    from mlflow.entities import Run

    from models.config import SegmentorConfig

log = logging.getLogger(__name__)
T = TypeVar("T")
EVAL_PARAM_KEYS = ("run", "config", "mode", "checkpoint", "precision", "tf32", "deform_attn_backend")

# tracking URIs found unreachable in this process: every later Tracker logs to its fallback at once
_UNREACHABLE: set[str] = set()


@dataclass(frozen=True)
class _TrainingRun:
    """What ``start_training_run`` was given (to re-open the run in the fallback store)."""

    run_name: str
    config: SegmentorConfig
    run_params: RunParams
    tags: dict[str, str]
    parent: str | None
    inputs: list[DatasetInput]


class Tracker:
    """Logs the pipeline's runs to MLflow; no call raises, and with ``settings.enabled`` False none logs.

    Args:
        settings: the ``tracking`` section of params.yaml.
        fallback_dir: folder of the local store used when ``settings.uri`` cannot be reached.
    """

    def __init__(self, settings: Tracking, *, fallback_dir: Path) -> None:
        self.settings = settings
        self.fallback_dir = Path(fallback_dir)
        self._store: MlflowStore | None = None
        self._on_fallback = False
        self._training: _TrainingRun | None = None
        self._run_name: str | None = None
        self._run_id: str | None = None
        self._monitor: Any = None
        if settings.enabled:
            configure_mlflow(settings)

    @property
    def fallback_uri(self) -> str:
        return f"sqlite:///{(self.fallback_dir / FALLBACK_DB).resolve()}"

    @property
    def uri(self) -> str:
        """The tracking URI in use (the fallback store's after a switch)."""
        return self.fallback_uri if self._on_fallback else self.settings.uri

    @property
    def run_id(self) -> str | None:
        """The active training run's id (None outside start_training_run ... end_run)."""
        return self._run_id

    # -- store selection and fallback -----------------------------------------------------------------

    def _current(self) -> MlflowStore:
        if self._store is None:
            if self.settings.uri in _UNREACHABLE:
                return self._use_fallback(None)
            self._store = MlflowStore(self.settings.uri, views=self._views())
        return self._store

    def _views(self) -> dict[str, dict[str, Any]]:
        """The runs-table view saved on each of our experiments (:mod:`pipelines.reporting.mlflow_views`)."""
        return {
            self.settings.experiment: runs_view_state(),
            self.settings.reference_experiment: reference_view_state(),
        }

    def _use_fallback(self, err: Exception | None) -> MlflowStore:
        """Switch to the local store (once) and re-open the active training run there."""
        self._stop_monitor()
        self.fallback_dir.mkdir(parents=True, exist_ok=True)
        reason = "was unreachable earlier in this process" if err is None else f"is unreachable ({err})"
        log.warning("MLflow tracking URI %s %s: logging to %s", self.settings.uri, reason, self.fallback_uri)
        _UNREACHABLE.add(self.settings.uri)
        self._store = None  # if the local store cannot be opened either, the next call tries again
        self._store = MlflowStore(
            self.fallback_uri, artifact_root=self.fallback_dir / FALLBACK_ARTIFACTS, views=self._views()
        )
        self._on_fallback = True
        active, self._run_id = self._run_id, None  # stays None if re-opening fails: later calls are no-ops
        if active is not None:
            self._run_id = self._open_training_run(self._store)
            # the server's copy of this run stays RUNNING there: `vitadapter tracking sync` copies the
            # fallback records over and marks it failed over, found by this tag
            self._store.log(self._run_id, tags={TAG_FAILED_OVER_FROM: f"{self.settings.uri}#{active}"})
            log.warning(
                "MLflow run %s on %s continues as run %s on %s; when the server is back: "
                "vitadapter tracking sync --from %s --to %s",
                active,
                self.settings.uri,
                self._run_id,
                self.fallback_uri,
                self.fallback_uri,
                self.settings.uri,
            )
        return self._store

    def _guarded(self, what: str, operation: Callable[[MlflowStore], T]) -> T | None:
        """Run ``operation`` on the store in use; on an unreachable store, again on the fallback store."""
        if not self.settings.enabled:
            return None
        try:
            return operation(self._current())
        except Exception as err:  # tracking must never stop training or evaluation: log, fall back
            if self._on_fallback or not is_unreachable(err):
                log.warning("MLflow: could not %s on %s: %s", what, self.uri, err, exc_info=True)
                return None
            failure = err
        try:
            return operation(self._use_fallback(failure))
        except Exception as err:  # the local store failing too must not stop the run either
            log.warning("MLflow: could not %s on %s: %s", what, self.uri, err, exc_info=True)
            return None

    # -- training runs --------------------------------------------------------------------------------

    def start_training_run(
        self,
        *,
        run_name: str,
        config: SegmentorConfig,
        run_params: RunParams,
        tags: dict[str, str],
        parent: str | None,
        inputs: list[DatasetInput] | None = None,
    ) -> None:
        """Start, or resume when its last run did not finish, the MLflow run of training run ``run_name``.

        Args:
            run_name: the run's name in params.yaml (tag ``vitadapter.run``).
            config: the resolved zoo config (logged as flattened params).
            run_params: the run's params.yaml entry (logged under ``run.``).
            tags: tags of the run (git commit, DVC stage, data checksum, Prefect flow run, ...).
            parent: first run of the chain this run belongs to (its runs become children of one chain
                run), or None.
            inputs: the datasets it reads (:func:`pipelines.reporting.mlflow_views.dataset_input`), logged as
                MLflow dataset inputs.
        """
        if not self.settings.enabled:
            return
        self._training = _TrainingRun(run_name, config, run_params, dict(tags), parent, list(inputs or ()))
        self._run_name = run_name
        self._run_id = self._guarded(f"start the run of {run_name}", self._open_training_run)

    def _open_training_run(self, store: MlflowStore) -> str:
        spec = self._training
        if spec is None:
            raise RuntimeError("no training run to open: call start_training_run first")
        experiment = self.settings.experiment
        iterations = spec.run_params.train.max_iters or spec.config.schedule.max_iters
        tags = {
            **row_tags(spec.config, iterations=iterations),
            **spec.tags,
            TAG_RUN: spec.run_name,
            TAG_KIND: KIND_TRAIN,
            TAG_ZOO: spec.config.name,
        }
        text = (
            f"Training run {spec.run_name}: {spec.config.name} on {spec.config.data.dataset}, {iterations} "
            f"iterations. Its evaluations are the runs of its group; the published rows are in experiment "
            f"{self.settings.reference_experiment}."
        )
        own = not has_published_row(spec.config)  # a user's card: no published row to set it against
        published_numbers: dict[str, float | str | None] = (
            dict.fromkeys(("ss", "ms"), NO_PUBLISHED_ROW)
            if own
            else {"ss": spec.config.published.miou_ss, "ms": spec.config.published.miou_ms}
        )
        if own:
            tags[TAG_PUBLISHED] = NO_PUBLISHED_ROW
        tags[SUMMARY_TEXT_TAG] = text
        tags[DESCRIPTION_TAG] = run_summary(text, {}, published_numbers)
        if spec.parent is not None:
            tags[TAG_CHAIN] = spec.parent
            tags[PARENT_TAG] = self._chain_run(store, spec.parent)
        latest = store.find_runs(experiment, {TAG_RUN: spec.run_name, TAG_KIND: KIND_TRAIN}, max_results=1)
        resumed = bool(latest) and latest[0].info.status != "FINISHED"
        if resumed:
            run_id = latest[0].info.run_id
            store.client.update_run(run_id, status="RUNNING")
            if TAG_FAILURE in latest[0].data.tags:  # the rerun resumes the failed run: the reason is history
                log.info(
                    "MLflow run %s failed before (%s); resuming it", run_id, latest[0].data.tags[TAG_FAILURE]
                )
                store.client.delete_tag(run_id, TAG_FAILURE)
            logged = latest[0].data.params
            log.info("resuming MLflow run %s of %s on %s", run_id, spec.run_name, store.uri)
        else:
            run_id = store.create_run(experiment, spec.run_name, tags)
            logged = {}
        params = {**flatten_params(spec.config.to_dict()), **flatten_params(asdict(spec.run_params), "run")}
        # the backend asked for; the param deform_attn_backend is the one that ran (logged when training ends)
        if "deform_attn_backend" in params:
            params["deform_attn_backend_requested"] = params.pop("deform_attn_backend")
        # what ran, not the recipe's numbers beside it: the run's iterations, batch and processes
        knobs, world = spec.run_params.train, max(spec.run_params.gpus, 1) * spec.run_params.nodes
        params["schedule.max_iters"] = str(knobs.max_iters or spec.config.schedule.max_iters)
        params["data.train.gpus"] = str(world)
        if knobs.global_batch or knobs.batch_size:
            params["data.train.samples_per_gpu"] = str(
                knobs.batch_size or max((knobs.global_batch or 0) // world, 1)
            )
        changed = sorted(key for key, value in params.items() if key in logged and logged[key] != value)
        if changed:
            log.warning("MLflow params cannot change; run %s keeps its logged %s", run_id, ", ".join(changed))
        published = spec.config.published
        store.log(
            run_id,
            params={key: value for key, value in params.items() if key not in logged},
            tags=tags,
            metrics={}
            if resumed or own
            else {
                "published_ss_mIoU": published.miou_ss,
                "published_ms_mIoU": published.miou_ms,
                "published_params_M": published.params_m,
            },
        )
        if not resumed:
            store.log_inputs(run_id, spec.inputs)
        self._start_monitor(store, run_id, resumed)
        return run_id

    def _chain_run(self, store: MlflowStore, chain: str) -> str:
        """The parent run of the chain that starts with run ``chain`` (created once)."""
        tags = {TAG_KIND: KIND_CHAIN, TAG_CHAIN: chain}
        return store.find_or_create(self.settings.experiment, f"{chain}-chain", tags, oldest=True)

    def _start_monitor(self, store: MlflowStore, run_id: str, resumed: bool) -> None:
        """System metrics (``system/*``): the monitor ``mlflow.start_run(log_system_metrics=True)`` uses."""
        self._stop_monitor()
        if importlib.util.find_spec("psutil") is None:
            log.info("psutil is not installed: no system metrics for MLflow run %s", run_id)
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(run_id, resume_logging=resumed, tracking_uri=store.uri)
            self._monitor.start()
        except Exception as err:  # system metrics are optional: never stop training for them
            log.warning("MLflow: no system metrics for run %s: %s", run_id, err)
            self._monitor = None

    def _stop_monitor(self) -> None:
        if self._monitor is not None:
            monitor, self._monitor = self._monitor, None
            monitor.finish()

    def log_metrics(self, metrics: Mapping[str, Any], *, step: int) -> None:
        """Log the finite numbers of ``metrics`` at ``step`` on the active training run (one request)."""
        if self._run_id is not None:
            self._guarded("log metrics", lambda store: store.log(self._run_id, metrics=metrics, step=step))

    def log_params(self, params: Mapping[str, str]) -> None:
        """Log ``params`` on the active training run (params are write-once: log each when it is known)."""
        if self._run_id is not None:
            self._guarded("log params", lambda store: store.log(self._run_id, params=dict(params)))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Set ``tags`` on the active training run."""
        if self._run_id is not None:
            self._guarded("set tags", lambda store: store.log(self._run_id, tags=tags))

    def log_model(self, *, checkpoint: Path, config: SegmentorConfig, overrides: Mapping[str, Any]) -> None:
        """Log ``checkpoint`` as the active training run's MLflow model (a pyfunc: image in, class map out),
        registered under the zoo entry's name where the store has a registry
        (:func:`pipelines.reporting.mlflow_model.log_segmentation_model`)."""
        if self._run_id is None:
            return
        from pipelines.reporting.mlflow_model import log_segmentation_model

        def upload(store: MlflowStore) -> None:
            log_segmentation_model(
                store.client, self._run_id, checkpoint=checkpoint, config=config, overrides=dict(overrides)
            )

        self._guarded(f"log the model of {config.name}", upload)

    def log_recipe_diff(self, diff: Mapping[str, Any]) -> None:
        """The training's recipe diff on the active training run (:func:`pipelines.reporting.mlflow_store.record_diff`)."""
        if self._run_id is not None:
            self._guarded("log the recipe diff", lambda store: record_diff(store, self._run_id, diff))

    def end_run(self, status: str = "FINISHED") -> None:
        """End the active training run (FAILED instead of FINISHED while an exception propagates)."""
        if self._run_id is not None:
            frame = inspect.currentframe()
            status = final_status(status, frame.f_back if frame is not None else None)
            self._stop_monitor()
            self._guarded("summarise the run", lambda store: refresh_summary(store, self._run_id))
            self._guarded("end the run", lambda store: store.client.set_terminated(self._run_id, status))
        self._stop_monitor()  # a switch to the fallback store during the call re-opened the run there
        self._run_id = None
        self._training = None

    def log_run_files(self, run_dir: Path) -> None:
        """Attach the run folder's config, key report, training log and a training-curve plot to the run."""
        run_dir = Path(run_dir)
        run_name = self._run_name or run_dir.name

        def upload(store: MlflowStore) -> None:
            tags = {TAG_RUN: run_name, TAG_KIND: KIND_TRAIN}
            run_id = store.find_or_create(self.settings.experiment, run_name, tags)
            for name in TRAIN_FILES:
                if (run_dir / name).is_file():
                    store.client.log_artifact(run_id, str(run_dir / name))
            figure = training_curve(run_dir / TRAIN_FILES[2])
            if figure is not None:
                store.client.log_figure(run_id, figure, CURVE_ARTIFACT)

        self._guarded(f"log the files of {run_name}", upload)

    # -- evaluation, reference, report ----------------------------------------------------------------

    def log_evaluation(
        self,
        *,
        run_name: str,
        mode: str,
        metrics: dict,
        per_class: dict,
        artifacts: list[Path],
        tags: dict[str, str],
        confusion_files: list[Path] | None = None,
        inputs: list[DatasetInput] | None = None,
    ) -> None:
        """An evaluation run under the training run ``run_name``; its numbers also go on that run.

        Args:
            run_name: the evaluated training run (tag ``vitadapter.run``); without one, a stand-alone run.
            mode: ``ss`` or ``ms``.
            metrics: the evaluation summary (``mIoU``, ``aAcc``, ``mAcc``, ``published_miou``,
                ``delta_miou``, ``num_images``, ``checkpoint``, ...).
            per_class: columns ``name``, ``IoU``, ``Acc`` (logged as an MLflow table).
            artifacts: sample overlay images.
            tags: tags of the run.
            confusion_files: the confusion matrix's CSV and heat map (logged under ``confusion_<mode>``).
            inputs: the dataset it read (an MLflow dataset input).
        """

        def record(store: MlflowStore) -> None:
            experiment = self.settings.experiment
            found = store.find_runs(experiment, {TAG_RUN: run_name, TAG_KIND: KIND_TRAIN}, max_results=1)
            eval_tags = {**tags, TAG_RUN: run_name, TAG_KIND: KIND_EVAL, TAG_MODE: mode}
            if metrics.get("published") == NO_PUBLISHED_ROW:  # a user's card: no delta to show
                eval_tags[TAG_PUBLISHED] = NO_PUBLISHED_ROW
            if found:
                eval_tags[PARENT_TAG] = found[0].info.run_id
                # the vocabulary shared with the published rows (dataset, head, crop, ...), as on its training run
                eval_tags.update({k: v for k, v in found[0].data.tags.items() if k in ROW_TAG_KEYS})
            elif "vitadapter.dataset" in tags:
                eval_tags.setdefault("dataset", tags["vitadapter.dataset"])
            else:
                log.info("no MLflow training run of %s: logging a stand-alone evaluation run", run_name)
            run_id = store.create_run(experiment, f"{run_name}-eval-{mode}", eval_tags)
            summary = evaluation_metrics(mode, metrics)
            store.log(
                run_id,
                metrics=summary,
                params={k: str(metrics[k]) for k in EVAL_PARAM_KEYS if k in metrics},
            )
            if metrics.get("recipe_diff") is not None:
                record_diff(store, run_id, metrics["recipe_diff"])
            store.log_inputs(run_id, list(inputs or ()))
            store.client.log_table(run_id, data=per_class, artifact_file=f"per_class_{mode}.json")
            for path in artifacts:
                store.client.log_artifact(run_id, str(path), f"overlays_{mode}")
            for path in confusion_files or ():
                store.client.log_artifact(run_id, str(path), f"confusion_{mode}")
            store.client.set_terminated(run_id, "FINISHED")
            if found:
                prefixed = {k: v for k, v in summary.items() if k.startswith(f"{mode}_")}
                store.log(found[0].info.run_id, metrics=prefixed)
                refresh_summary(store, found[0].info.run_id)

        self._guarded(f"log the {mode} evaluation of {run_name}", record)

    def sync_reference_experiment(self) -> None:
        """Make ``settings.reference_experiment`` hold each published row of the zoo once (idempotent)."""

        def sync(store: MlflowStore) -> None:
            experiment = self.settings.reference_experiment
            existing: dict[str, Run] = {}
            for run in store.find_runs(experiment, {TAG_KIND: KIND_REFERENCE}, newest_first=False):
                existing.setdefault(run.data.tags.get(TAG_ZOO, ""), run)
            created = 0
            for name, (metrics, params, tags) in reference_rows().items():
                run = existing.get(name)
                if run is None:
                    run_id, created = store.create_run(experiment, name, tags), created + 1
                    old_metrics, old_params, old_tags = {}, {}, tags
                else:
                    run_id = run.info.run_id
                    old_metrics, old_params, old_tags = run.data.metrics, run.data.params, run.data.tags
                store.log(
                    run_id,
                    metrics={k: v for k, v in metrics.items() if old_metrics.get(k) != v},
                    params={k: v for k, v in params.items() if k not in old_params},
                    tags={k: v for k, v in tags.items() if old_tags.get(k) != v},
                )
                if run is None or run.info.status != "FINISHED":
                    store.client.set_terminated(run_id, "FINISHED")
            log.info("MLflow reference experiment %s on %s: %d new rows", experiment, store.uri, created)

        self._guarded("sync the reference experiment", sync)

    def log_report(self, report: Path, rows: list[dict]) -> None:
        """A ``report`` run with the markdown report and its rows as a table."""

        def record(store: MlflowStore) -> None:
            run_id = store.create_run(self.settings.experiment, "report", {TAG_KIND: KIND_REPORT})
            store.client.log_artifact(run_id, str(report))
            if rows:
                columns = list(dict.fromkeys(key for row in rows for key in row))
                table = {key: [row.get(key) for row in rows] for key in columns}
                store.client.log_table(run_id, data=table, artifact_file="report_rows.json")
            evaluated = sum(row.get("miou") is not None for row in rows)
            store.log(run_id, metrics={"rows": len(rows), "evaluated_rows": evaluated})
            store.client.set_terminated(run_id, "FINISHED")

        self._guarded("log the report", record)

    def ui_addresses(self) -> dict[str, str]:
        """Where to look in the MLflow UI: per experiment (ours, the reference rows), its runs table in our saved
        view (:func:`pipelines.reporting.mlflow_views.ui_hint`); empty with tracking off or no store."""

        def addresses(store: MlflowStore) -> dict[str, str]:
            names = (self.settings.experiment, self.settings.reference_experiment)
            return {name: ui_hint(store.uri, store.experiment_id(name)) for name in names}

        return self._guarded("find the experiments", addresses) or {}
