"""What the MLflow UI shows of our runs, without MLflow: the saved runs-table views, their address, the
datasets a run read, and the summary at the top of a training run's page.

The MLflow 3 UI opens an experiment on its GenAI pages unless the address says ``workflowType=machine_learning``,
and its runs table shows no metric column until one is picked by hand. Both are settled by the address
:func:`runs_table_url` builds: the model-training pages, and a view we save on the experiment (the tag
``mlflow.sharedViewState.<key>``, which the UI reads when the address names ``viewStateShareKey=<key>``)
with the columns that compare a run with the paper (total loss, validation mIoU, SS/MS mIoU beside the
published SS/MS mIoU) and the runs grouped by training run (each training run beside its evaluations).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# the experiment tag the UI reads a shared view from, and the key our views are saved under
VIEW_TAG_PREFIX = "mlflow.sharedViewState."
VIEW_KEY = "vitadapter"
VIEW_TAG = VIEW_TAG_PREFIX + VIEW_KEY
# the UI's column ids: "<metrics|params|tags|attributes>.`<name>`"
RUN_METRIC_COLUMNS = (
    "train/loss",
    "val/mIoU",
    "ss_mIoU",
    "published_ss_mIoU",
    "ms_mIoU",
    "published_ms_mIoU",
)
REFERENCE_METRIC_COLUMNS = ("ss_mIoU", "ms_mIoU", "params_M")
REFERENCE_TAG_COLUMNS = ("head", "crop", "schedule", "pretrained")
# the run description's text below its summary table (the table is refreshed from the run's metrics)
SUMMARY_TEXT_TAG = "vitadapter.summary_text"
# metrics rounded as the published tables print them (two decimals of a percentage)
PERCENT_DECIMALS = 2


def column(kind: str, name: str) -> str:
    """The UI's id of a runs-table column (``kind``: metrics, params, tags, attributes)."""
    return f"{kind}.`{name}`"


def _view(columns: list[str], group_by_tag: str, widths: Mapping[str, int]) -> dict[str, Any]:
    return {
        "selectedColumns": columns,
        "columnOrder": columns,
        "columnWidths": dict(widths),
        # runs of one group listed flat (a chain's parent run would otherwise fold its runs away)
        "groupBy": {
            "aggregateFunction": "max",
            "groupByKeys": [{"mode": "tag", "groupByData": group_by_tag}],
        },
        "runListHidden": False,
        "viewMaximized": False,
    }


def runs_view_state() -> dict[str, Any]:
    """Our experiment's view: per training run (group ``vitadapter.run``), its training and evaluation runs
    with total loss, validation mIoU, SS/MS mIoU and the published SS/MS mIoU, the dataset and the zoo entry."""
    metrics = [column("metrics", name) for name in RUN_METRIC_COLUMNS]
    columns = [*metrics, column("tags", "dataset"), column("tags", "vitadapter.zoo_entry")]
    widths = {name: 150 for name in metrics} | {column("tags", "vitadapter.zoo_entry"): 380}
    return _view(columns, "vitadapter.run", widths)


def reference_view_state() -> dict[str, Any]:
    """The reference experiment's view: the published rows grouped by dataset, with SS/MS mIoU, parameters,
    head, crop, schedule and pretrained weights."""
    metrics = [column("metrics", name) for name in REFERENCE_METRIC_COLUMNS]
    columns = [*metrics, *(column("tags", name) for name in REFERENCE_TAG_COLUMNS)]
    return _view(columns, "dataset", {name: 110 for name in metrics} | {column("tags", "pretrained"): 200})


def view_tag_value(state: Mapping[str, Any]) -> str:
    """The tag value the UI parses (plain JSON is one of the forms it reads)."""
    return json.dumps(state, sort_keys=True)


def runs_table_url(ui_url: str, experiment_id: str) -> str:
    """The address of an experiment's runs table on the model-training pages, in our saved view."""
    return (
        f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs"
        f"?workflowType=machine_learning&viewStateShareKey={VIEW_KEY}"
    )


def ui_hint(tracking_uri: str, experiment_id: str, *, port: int = 5000) -> str:
    """How to open the runs table of ``experiment_id``: the address on a tracking server; for a local store,
    the ``mlflow server`` command to start first and the address it serves."""
    if tracking_uri.startswith(("http://", "https://")):
        return runs_table_url(tracking_uri, experiment_id)
    return (
        f"mlflow server --backend-store-uri {tracking_uri} --port {port}, then "
        f"{runs_table_url(f'http://127.0.0.1:{port}', experiment_id)}"
    )


def percent(value: Any) -> Any:
    """A percentage rounded as the published tables print it; anything else unchanged."""
    if isinstance(value, float):
        return round(value, PERCENT_DECIMALS)
    return value


@dataclass(frozen=True)
class DatasetInput:
    """A split of a prepared shard folder as an MLflow dataset input (``mlflow.log_input``).

    Attributes:
        name: ``<dataset>/<split>`` (``ade20k/train``).
        digest: the first 16 hex digits of the split's shard checksums' sha256 (a new preparation, a new digest).
        source: the shard folder (absolute).
        profile: samples, classes, shards and where the data came from (synthetic twin or official files).
        context: ``training`` or ``evaluation`` (the UI's dataset context).
    """

    name: str
    digest: str
    source: str
    profile: dict[str, Any]
    context: str


def dataset_input(data_dir: Path, split: str, context: str) -> DatasetInput | None:
    """The ``split`` of the shard folder ``data_dir`` as a dataset input (None when its index is unreadable:
    the run's tracking never fails for it)."""
    import hashlib

    index_file = Path(data_dir) / "index.json"
    try:
        index = json.loads(index_file.read_text())
        part = index["splits"][split]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    digest = hashlib.sha256("".join(shard["sha256"] for shard in part["shards"]).encode()).hexdigest()
    profile = {
        "num_samples": part.get("num_samples"),
        "num_classes": index.get("num_classes"),
        "num_shards": len(part["shards"]),
        "source": (index.get("source") or {}).get("kind"),
    }
    return DatasetInput(
        name=f"{index.get('dataset', Path(data_dir).name)}/{split}",
        digest=digest[:16],
        source=str(Path(data_dir).resolve()),
        profile=profile,
        context=context,
    )


def run_summary(
    description: str, metrics: Mapping[str, float], published: Mapping[str, float | str | None]
) -> str:
    """A training run's page description: first a table of its SS/MS mIoU beside the published SS/MS mIoU,
    its best validation mIoU and last total loss (``-`` where there is no number yet, a text such as
    ``no published row`` as is; the table comes first because the page shows only the description's first
    lines), then ``description``."""

    def fmt(value: float | str | None, digits: int = 2) -> str:
        if isinstance(value, str):
            return value
        return "-" if value is None else f"{value:.{digits}f}"

    rows = [
        "| | ours | published |",
        "|---|---|---|",
        f"| SS mIoU | {fmt(metrics.get('ss_mIoU'))} | {fmt(published.get('ss'))} |",
        f"| MS mIoU | {fmt(metrics.get('ms_mIoU'))} | {fmt(published.get('ms'))} |",
        f"| validation mIoU (best) | {fmt(metrics.get('val/mIoU'))} | |",
        f"| total loss (last) | {fmt(metrics.get('train/loss'), 4)} | |",
    ]
    return "\n".join(rows) + "\n\n" + description + "\n"
