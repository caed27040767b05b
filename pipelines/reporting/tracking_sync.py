"""``vitadapter tracking sync``: copy the runs of one MLflow store (the local fallback) into another (the server).

When the tracking server is unreachable mid-run, the records go on in the local fallback store
(:class:`pipelines.reporting.tracking.Tracker`), and the server's copy of the run stays RUNNING. This copies
every run of the source store into the target store, experiment by experiment, with its params, tags, full
metric histories and artifacts, keeps the parent links (chains, evaluations) and the status, and marks the
server's copy of a failed-over run as failed over (FAILED, tagged with the run that continued it). It is
idempotent: a run already copied (tag ``vitadapter.synced_from``) is skipped, so running it twice adds
nothing.

It is the second module that imports mlflow (a separate tool over two stores, beside the tracker).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from typing import Any

from pipelines.reporting.records import PARENT_TAG, TAG_FAILED_OVER_FROM, TAG_SYNCED_FROM, quote

log = logging.getLogger(__name__)

METRIC_BATCH = 1000  # MLflow's log_batch limit of metrics per request


@dataclass
class SyncReport:
    """What a sync did: runs copied, skipped (copied before), and server runs marked failed over."""

    copied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed_over: list[str] = field(default_factory=list)


def _exists(client: Any, run_id: str) -> bool:
    """Whether ``run_id`` is a run of the store behind ``client``."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(run_id)
    except MlflowException:
        return False
    return True


def sync_stores(source_uri: str, target_uri: str) -> SyncReport:
    """Copy every run of ``source_uri`` into ``target_uri`` (see the module docstring).

    Raises:
        ValueError: both URIs are the same store.
    """
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    if source_uri == target_uri:
        raise ValueError(f"tracking sync: --from and --to are the same store ({source_uri})")
    source, target = MlflowClient(tracking_uri=source_uri), MlflowClient(tracking_uri=target_uri)
    report = SyncReport()
    for experiment in source.search_experiments():
        found = target.get_experiment_by_name(experiment.name)
        target_experiment = found.experiment_id if found else target.create_experiment(experiment.name)
        runs = sorted(source.search_runs([experiment.experiment_id]), key=lambda r: r.info.start_time or 0)
        copies: dict[str, str] = {}  # source run id -> target run id
        for run in runs:
            origin = f"{source_uri}#{run.info.run_id}"
            done = target.search_runs([target_experiment], f"tags.`{TAG_SYNCED_FROM}` = {quote(origin)}")
            if done:
                copies[run.info.run_id] = done[0].info.run_id
                report.skipped.append(run.info.run_id)
                continue
            tags = {
                k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.") or k == "mlflow.runName"
            }
            parent = run.data.tags.get(PARENT_TAG)
            if parent in copies:
                tags[PARENT_TAG] = copies[parent]
            tags[TAG_SYNCED_FROM] = origin
            copy = target.create_run(
                target_experiment, start_time=run.info.start_time, tags=tags, run_name=run.info.run_name
            )
            new_id = copy.info.run_id
            copies[run.info.run_id] = new_id
            target.log_batch(new_id, params=[Param(k, v) for k, v in run.data.params.items()])
            metrics = [
                Metric(key, m.value, m.timestamp, m.step)
                for key in run.data.metrics
                for m in source.get_metric_history(run.info.run_id, key)
            ]
            for start in range(0, len(metrics), METRIC_BATCH):
                target.log_batch(new_id, metrics=metrics[start : start + METRIC_BATCH])
            with tempfile.TemporaryDirectory() as folder:
                if source.list_artifacts(run.info.run_id):
                    local = source.download_artifacts(run.info.run_id, "", folder)
                    target.log_artifacts(new_id, local)
            if run.info.status != "RUNNING":
                target.set_terminated(new_id, run.info.status, end_time=run.info.end_time)
            report.copied.append(run.info.run_id)
            server_run = run.data.tags.get(TAG_FAILED_OVER_FROM, "").rpartition("#")[2]
            if server_run and _exists(target, server_run):
                target.set_tag(server_run, TAG_FAILED_OVER_FROM.replace("from", "to"), new_id)
                target.set_terminated(server_run, "FAILED")
                report.failed_over.append(server_run)
                log.info(
                    "server run %s failed over to %s (copied as %s)", server_run, run.info.run_id, new_id
                )
    log.info(
        "synced %s -> %s: %d runs copied, %d already there, %d server runs marked failed over",
        source_uri,
        target_uri,
        len(report.copied),
        len(report.skipped),
        len(report.failed_over),
    )
    return report
