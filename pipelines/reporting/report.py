"""The comparison report: every evaluated run and mode against the published number of its zoo entry.

Whether a row is comparable with the published number comes from the evaluation's recipe diff
(:mod:`pipelines.runs.recipe_diff`: the training's and the evaluation's deviations from the published row),
which the note column names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipelines.config.datasets import NO_PUBLISHED_ROW, has_published_row, published_miou
from pipelines.config.params import Params


def report_rows(params: Params) -> list[dict[str, Any]]:
    """One row per run and evaluation mode: ours against the published number."""
    rows = []
    for name, run in params.runs.items():
        config = run.model_config()
        for mode in run.eval.modes:
            ours = _evaluation_record(params, name, mode)
            diff = (ours or {}).get("recipe_diff")
            rows.append(
                {
                    "run": name,
                    "config": run.config,
                    "dataset": config.data.dataset,
                    "mode": mode,
                    "miou": None if ours is None else ours["mIoU"],
                    "published_miou": published_miou(config, mode),
                    "delta_miou": None if ours is None else ours["delta_miou"],
                    # trained on a user's card: the entry's published numbers are another task
                    "published_row": has_published_row(config),
                    "params_published_m": config.published.params_m,
                    "overrides": bool(run.overrides or run.preset),
                    "extension": config.published.extension,
                    "comparable": None if diff is None else bool(diff["comparable"]),
                    "deviations": None if diff is None else [d["key"] for d in diff["deviations"]],
                }
            )
    return rows


def _evaluation_record(params: Params, name: str, mode: str) -> dict[str, Any] | None:
    """The whole evaluation record (with its recipe diff), else the metrics file, else None."""
    for path in (
        Path(params.paths.reports) / "records" / name / f"eval_{mode}.json",
        params.metrics_dir(name) / f"eval_{mode}.json",
    ):
        if path.is_file():
            return json.loads(path.read_text())
    return None


def _note(row: dict[str, Any]) -> str:
    if row.get("extension"):
        return "extension entry: nothing published to compare with"
    if row.get("published_row") is False:
        return f"own data ({row['dataset']}): {NO_PUBLISHED_ROW}"
    if row.get("comparable") is None:  # not evaluated yet, or before recipe diffs were recorded
        return "modified config (preset/overrides): not comparable" if row["overrides"] else ""
    if row["comparable"]:
        return "comparable"
    return "not comparable: " + ", ".join(row["deviations"])


def report_markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table."""

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    lines = [
        "# ViT-Adapter runs against the published table",
        "",
        "| run | zoo entry | mode | mIoU (ours) | mIoU (published) | delta | comparable |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        own = row.get("published_row") is False
        published = NO_PUBLISHED_ROW if own else fmt(row["published_miou"])
        delta = NO_PUBLISHED_ROW if own else fmt(row["delta_miou"])
        lines.append(
            f"| {row['run']} | {row['config']} | {row['mode'].upper()} | {fmt(row['miou'])} | "
            f"{published} | {delta} | {_note(row)} |"
        )
    return "\n".join(lines) + "\n"
