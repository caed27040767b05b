"""One MLflow tracking store behind an explicit client: experiments, runs, batched logging, and what counts as an
unreachable store. :class:`pipelines.reporting.tracking.Tracker` (fallback, training runs) is built on it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.config.params import Tracking
from pipelines.reporting.mlflow_views import (
    SUMMARY_TEXT_TAG,
    VIEW_TAG,
    DatasetInput,
    run_summary,
    view_tag_value,
)
from pipelines.reporting.records import (
    DESCRIPTION_TAG,
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    MAX_TAG_VALUE,
    RECIPE_DIFF_ARTIFACT,
    TAG_COMPARABLE,
    TAG_PUBLISHED,
    clip,
    finite,
    metric_name,
    quote,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

# MLflow error codes that say the request was wrong, not that the store is unreachable
_REQUEST_ERRORS = frozenset(
    {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST"}
)


def configure_mlflow(settings: Tracking) -> None:
    """Bound HTTP waits and disable telemetry; must run before the first MLflow call."""
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(settings.timeout_s)
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(settings.max_retries)
    if "MLFLOW_DISABLE_TELEMETRY" not in os.environ:  # an explicit choice of the user stands
        os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
        if "mlflow" in sys.modules:  # imported before this call: its telemetry client already started
            from mlflow.telemetry import set_telemetry_client

            set_telemetry_client()


def is_unreachable(err: Exception) -> bool:
    """Whether ``err`` means the store cannot be used (connection, server, database), not a bad request."""
    import requests
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError  # the database behind a sqlite:// store

    if isinstance(err, MlflowException):
        return err.error_code not in _REQUEST_ERRORS
    return isinstance(err, requests.RequestException | OSError | SQLAlchemyError)


class MlflowStore:
    """One tracking store: a client bound to its URI and the experiment ids resolved on it.

    Args:
        uri: the tracking URI.
        artifact_root: where experiments created here keep their artifacts (default: ``mlruns`` beside the
            database of a ``sqlite:///`` store, else the store's own default).
        views: a runs-table view (:mod:`pipelines.reporting.mlflow_views`) per experiment name, saved on the
            experiment (tag ``mlflow.sharedViewState.vitadapter``) when it is first resolved here.
    """

    def __init__(
        self,
        uri: str,
        *,
        artifact_root: Path | None = None,
        views: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        from mlflow import MlflowClient

        self.uri = uri
        self.client: MlflowClient = MlflowClient(tracking_uri=uri)
        if artifact_root is None and uri.startswith("sqlite:///"):
            # a local store keeps its artifacts beside its database (MLflow's default is ./mlruns of
            # whichever folder the process runs in)
            artifact_root = Path(uri.removeprefix("sqlite:///")).parent / "mlruns"
        self._artifact_root = artifact_root
        self._views = dict(views or {})
        self._experiments: dict[str, str] = {}

    def experiment_id(self, name: str) -> str:
        """The id of experiment ``name``, created (or restored from deletion) when needed."""
        from mlflow.exceptions import MlflowException

        if name in self._experiments:
            return self._experiments[name]
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            location = (
                None if self._artifact_root is None else (self._artifact_root / name).resolve().as_uri()
            )
            try:
                # a model-training experiment: the UI opens on its runs table, not the GenAI views
                experiment_id = self.client.create_experiment(
                    name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
                )
            except MlflowException as err:  # created meanwhile by another process
                if err.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment_id = self.client.get_experiment_by_name(name).experiment_id
        else:
            experiment_id = experiment.experiment_id
            if experiment.lifecycle_stage == "deleted":
                self.client.restore_experiment(experiment_id)
        view = self._views.get(name)
        saved = {} if experiment is None else experiment.tags
        if view is not None and saved.get(VIEW_TAG) != view_tag_value(view):  # a newer version's columns
            self.client.set_experiment_tag(experiment_id, VIEW_TAG, view_tag_value(view))
        self._experiments[name] = experiment_id
        return experiment_id

    def log_inputs(self, run_id: str, inputs: list[DatasetInput]) -> None:
        """The datasets a run read (``mlflow.log_input``; the UI's Dataset column and run page)."""
        from mlflow.entities import Dataset, InputTag
        from mlflow.entities import DatasetInput as MlflowDatasetInput

        entries = [
            MlflowDatasetInput(
                Dataset(
                    name=item.name,
                    digest=item.digest,
                    source_type="local",
                    source=json.dumps({"uri": item.source}),
                    profile=json.dumps(item.profile),
                ),
                tags=[InputTag("mlflow.data.context", item.context)],
            )
            for item in inputs
        ]
        if entries:
            self.client.log_inputs(run_id, datasets=entries)

    def find_runs(
        self, experiment: str, tags: Mapping[str, str], *, max_results: int = 1000, newest_first: bool = True
    ) -> list[Run]:
        """Active runs of ``experiment`` carrying all ``tags``."""
        query = " AND ".join(f"tags.`{key}` = {quote(value)}" for key, value in tags.items())
        order = "DESC" if newest_first else "ASC"
        return list(
            self.client.search_runs(
                [self.experiment_id(experiment)],
                query,
                max_results=max_results,
                order_by=[f"attributes.start_time {order}"],
            )
        )

    def create_run(
        self, experiment: str, name: str, tags: Mapping[str, str], *, finished: bool = False
    ) -> str:
        tags = {key: clip(str(value), MAX_TAG_VALUE) for key, value in tags.items()}
        run_id = self.client.create_run(self.experiment_id(experiment), tags=tags, run_name=name).info.run_id
        if finished:
            self.client.set_terminated(run_id, "FINISHED")
        return run_id

    def find_or_create(
        self, experiment: str, name: str, tags: Mapping[str, str], *, oldest: bool = False
    ) -> str:
        """The newest (oldest) run carrying ``tags``, or a new finished one named ``name``."""
        found = self.find_runs(experiment, tags, max_results=1, newest_first=not oldest)
        return found[0].info.run_id if found else self.create_run(experiment, name, tags, finished=True)

    def log(
        self,
        run_id: str,
        *,
        metrics: Mapping[str, float] | None = None,
        step: int = 0,
        params: Mapping[str, str] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        """One ``log_batch`` (MLflow splits it into requests within its batch limits)."""
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        batch = {
            "metrics": [Metric(metric_name(k), v, now, step) for k, v in finite(metrics or {}).items()],
            "params": [Param(k, v) for k, v in (params or {}).items()],
            "tags": [RunTag(k, clip(str(v), MAX_TAG_VALUE)) for k, v in (tags or {}).items()],
        }
        if any(batch.values()):
            self.client.log_batch(run_id, **batch)


def record_diff(store: MlflowStore, run_id: str, diff: Mapping[str, Any]) -> None:
    """A recipe diff (:mod:`pipelines.runs.recipe_diff`) on a run: the ``recipe_diff.json`` artifact, the
    ``recipe_deviations`` metric (how many) and the ``comparable_to_published`` tag (``true``/``false``)."""
    store.client.log_dict(run_id, dict(diff), RECIPE_DIFF_ARTIFACT)
    store.log(
        run_id,
        metrics={"recipe_deviations": len(diff["deviations"])},
        tags={TAG_COMPARABLE: str(bool(diff["comparable"])).lower()},
    )


def refresh_summary(store: MlflowStore, run_id: str) -> None:
    """Refresh the table at the top of training run ``run_id``'s page from its own metrics: SS/MS mIoU beside
    the published numbers, best validation mIoU, last total loss (:func:`pipelines.reporting.mlflow_views.run_summary`)."""
    run = store.client.get_run(run_id)
    metrics = dict(run.data.metrics)
    validation = [m.value for m in store.client.get_metric_history(run_id, "val/mIoU")]
    if validation:
        metrics["val/mIoU"] = max(validation)
    text = run.data.tags.get(SUMMARY_TEXT_TAG, "")
    published: dict[str, float | str | None] = {
        mode: metrics.get(f"published_{mode}_mIoU") for mode in ("ss", "ms")
    }
    if run.data.tags.get(TAG_PUBLISHED):  # a user's card: "no published row" in place of the numbers
        published = dict.fromkeys(("ss", "ms"), run.data.tags[TAG_PUBLISHED])
    store.log(run_id, tags={DESCRIPTION_TAG: run_summary(text, metrics, published)})
