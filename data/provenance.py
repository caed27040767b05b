"""Where a prepared dataset came from: the official distribution (which archives, with their sha256) or a
synthetic twin.

``vitadapter data prepare`` records :func:`describe_raw` in the shards' ``index.json`` (``source``); a run
reads it back with :func:`dataset_source` to say whether its numbers come from the official data (the
recipe diff of :mod:`pipelines.runs.recipe_diff`). A twin is recognised by the owner marker its writer
leaves in its root (``vitadapter data synthesize``, :mod:`data.atomic`).

Descriptors (JSON-able dicts):

* ``{"kind": "synthetic", "written_by": ...}``: a synthetic twin;
* ``{"kind": "official", "archives": [{"file", "bytes", "sha256"}], "folders": [...]}``: the official
  distribution, read from these archives (hashed whole) and/or extracted folders (not hashed);
* ``{"kind": "own", "card": ..., "card_sha256": ..., "num_classes": ..., ...}``: a user's dataset card
  (``vitadapter data prepare --card``): no published row to compare with;
* ``{"kind": "unknown", "reason": ...}``: shards prepared before sources were recorded, or no index.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from data.atomic import OWNER_MARKER, file_sha256
from data.readers import RawSample

if TYPE_CHECKING:
    from data.cards import DatasetCard

log = logging.getLogger(__name__)

SYNTHESIZE_WRITER = "vitadapter data synthesize"


def _writer_of(folder: Path) -> str | None:
    marker = folder / OWNER_MARKER
    if not marker.is_file():
        return None
    try:
        return str(json.loads(marker.read_text()).get("written_by"))
    except (OSError, ValueError, AttributeError):
        return None


def describe_raw(raw: str | Path, samples: Iterable[RawSample]) -> dict[str, Any]:
    """The descriptor of the raw distribution ``samples`` were found in under ``raw``.

    Args:
        raw: the folder (or archive) given to ``prepare``.
        samples: the samples read from it (their files say which archives and folders were used).
    """
    raw = Path(raw)
    writer = _writer_of(raw) if raw.is_dir() else None
    if writer is not None and writer.startswith(SYNTHESIZE_WRITER):
        return {"kind": "synthetic", "written_by": writer}
    archives: set[str] = set()
    folders: set[str] = set()
    for sample in samples:
        for ref in (sample.image, sample.label):
            (folders if ref.source.kind == "dir" else archives).add(ref.source.path)
    described = []
    for archive in sorted(archives):
        path = Path(archive)
        log.info("hashing %s (recorded with the prepared shards)", path)
        described.append({"file": path.name, "bytes": path.stat().st_size, "sha256": file_sha256(path)})
    return {"kind": "official", "archives": described, "folders": sorted(Path(f).name for f in folders)}


def describe_card(card: DatasetCard) -> dict[str, Any]:
    """The descriptor of a dataset card's data: the card (file, sha256), its classes and where it reads from
    (folders and list files by path, parquet files with their sizes; not hashed: a user's data can be large)."""
    from data.cards import FolderSplit, ListSplit

    reads: dict[str, Any] = {}
    for split, source in card.splits.items():
        if isinstance(source, FolderSplit):
            reads[split] = {"images": str(source.images), "labels": str(source.labels)}
        elif isinstance(source, ListSplit):
            reads[split] = {
                "list": str(source.list),
                "images": str(source.images),
                "labels": str(source.labels),
            }
        else:
            reads[split] = {"parquet": [{"file": str(p), "bytes": p.stat().st_size} for p in source.files]}
    return {
        "kind": "own",
        "card": card.name,
        "card_file": str(card.path),
        "card_sha256": card.sha256,
        "num_classes": card.num_classes,
        "splits": reads,
    }


def dataset_source(folder: str | Path) -> dict[str, Any]:
    """The descriptor of a prepared shard folder (its ``index.json``) or of a raw folder given directly."""
    folder = Path(folder)
    index = folder / "index.json"
    if index.is_file():
        try:
            source = json.loads(index.read_text()).get("source")
        except (OSError, ValueError) as err:
            return {"kind": "unknown", "reason": f"{index} is unreadable ({err})"}
        if isinstance(source, dict) and source.get("kind") in ("official", "synthetic", "own"):
            return source
        return {
            "kind": "unknown",
            "reason": f"{index} records no source (prepared before sources were recorded: "
            "rerun `vitadapter data prepare ... --force`)",
        }
    writer = _writer_of(folder) if folder.is_dir() else None
    if writer is not None and writer.startswith(SYNTHESIZE_WRITER):
        return {"kind": "synthetic", "written_by": writer}
    if folder.exists():
        return {
            "kind": "official",
            "archives": [],
            "folders": [folder.name],
            "note": "raw folder, not hashed",
        }
    return {"kind": "unknown", "reason": f"{folder} does not exist"}
