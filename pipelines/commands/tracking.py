"""``vitadapter tracking sync``: copy the local fallback MLflow store into the tracking server."""

from __future__ import annotations

import argparse
import logging

from pipelines.config.params import DEFAULT_PARAMS, DEFAULT_PATHS

log = logging.getLogger(__name__)


def _sync(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipelines.config.params import load_params
    from pipelines.reporting.records import FALLBACK_DB
    from pipelines.reporting.tracking_sync import sync_stores

    target = args.to
    fallback = Path(DEFAULT_PATHS.tracking_fallback)
    if target is None or args.source is None:
        params = load_params(args.params)
        target = target or params.tracking.uri
        fallback = Path(params.paths.tracking_fallback)
    source = args.source or f"sqlite:///{(fallback / FALLBACK_DB).resolve()}"
    if source.startswith("sqlite:///") and not Path(source.removeprefix("sqlite:///")).is_file():
        raise FileNotFoundError(f"no fallback store at {source}: nothing to sync")
    report = sync_stores(source, target)
    print(
        f"{len(report.copied)} runs copied from {source} to {target}, {len(report.skipped)} already there, "
        f"{len(report.failed_over)} server runs marked failed over"
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "tracking",
        help="MLflow stores: copy the local fallback store into the tracking server",
        description=(
            "When the tracking server was unreachable, runs went on in a local fallback store "
            f"({DEFAULT_PATHS.tracking_fallback}/mlflow-fallback.db). `sync` copies them into the server (params, "
            "metric histories, tags, artifacts, parent links) and marks the server's copy of a failed-over run "
            "FAILED with a tag naming the run that continued it. Running it again copies nothing twice."
        ),
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    sync = actions.add_parser("sync", help="copy the fallback store's runs into the tracking server")
    sync.add_argument(
        "--from",
        dest="source",
        help="source tracking URI (default: the fallback store of params.yaml's paths)",
    )
    sync.add_argument(
        "--to", help="target tracking URI (default: params.yaml's tracking.uri or MLFLOW_TRACKING_URI)"
    )
    sync.add_argument(
        "--params", default=str(DEFAULT_PARAMS), help="params file for the defaults (default params.yaml)"
    )
    sync.set_defaults(func=_sync)
