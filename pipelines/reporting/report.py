"""The comparison report: every evaluated run and mode against the published number of its zoo entry."""

from __future__ import annotations

import json
from typing import Any

from pipelines.config.params import Params


def report_rows(params: Params) -> list[dict[str, Any]]:
    """One row per run and evaluation mode: ours against the published number."""
    rows = []
    for name, run in params.runs.items():
        config = run.model_config()
        for mode in run.eval.modes:
            path = params.metrics_dir(name) / f"eval_{mode}.json"
            ours = json.loads(path.read_text()) if path.is_file() else None
            rows.append(
                {
                    "run": name,
                    "config": run.config,
                    "dataset": config.data.dataset,
                    "mode": mode,
                    "miou": None if ours is None else ours["mIoU"],
                    "published_miou": config.published.miou(mode),
                    "delta_miou": None if ours is None else ours["delta_miou"],
                    "params_published_m": config.published.params_m,
                    "overrides": bool(run.overrides or run.preset),
                    "extension": config.published.extension,
                }
            )
    return rows


def report_markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table."""

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    lines = [
        "# ViT-Adapter runs against the published table",
        "",
        "| run | zoo entry | mode | mIoU (ours) | mIoU (published) | delta | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        note = "modified config (preset/overrides): not comparable" if row["overrides"] else ""
        if row.get("extension"):
            note = "; ".join(filter(None, ["extension entry: nothing published to compare with", note]))
        lines.append(
            f"| {row['run']} | {row['config']} | {row['mode'].upper()} | {fmt(row['miou'])} | "
            f"{fmt(row['published_miou'])} | {fmt(row['delta_miou'])} | {note} |"
        )
    return "\n".join(lines) + "\n"
