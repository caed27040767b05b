"""A dataset card's images and label maps as validated webdataset shards, like the official datasets'.

``prepare_card`` lists every split (:func:`data.card_readers.scan_split`), refuses files without a partner
(an image without a label map, a label map without an image) unless ``skip_unpaired`` (then they are skipped,
named in the log and recorded in ``index.json``), reads and converts every pair with the card's label rule,
and writes the shards through :func:`data.prepare.write_prepared` (staging folder, validation, atomic move).
``index.json`` records the card (file, sha256, content) and the card's classes and label convention. Re-running
with the same card, files and options is a no-op.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data.atomic import ForeignFolderError, check_disjoint, check_replaceable
from data.card_readers import CardSample, SplitScan, load_card_sample, scan_split
from data.cards import DatasetCard, LabelRule, ParquetSplit, load_card
from data.catalog import SPLITS, LabelError, Split, register_dataset
from data.prepare import LoadedItem, PrepareReport, existing_index, load_all, write_prepared
from data.provenance import describe_card
from data.readers import CorruptFileError
from data.shards import DEFAULT_SAMPLES_PER_SHARD, FORMAT_VERSION

log = logging.getLogger(__name__)

UNPAIRED_IMAGE = "an image without a label map (skipped: --skip-unpaired)"
UNPAIRED_LABEL = "a label map without an image (skipped: --skip-unpaired)"


class UnpairedFilesError(ValueError):
    """Images without a label map or label maps without an image; the message names them."""


def _load_card(sample: CardSample, rule: LabelRule) -> LoadedItem:
    try:
        loaded = load_card_sample(sample, rule)
    except (CorruptFileError, LabelError) as err:
        return LoadedItem(key=sample.key, error=str(err), error_type=type(err).__name__)
    return LoadedItem(
        key=sample.key,
        image_bytes=loaded.image_bytes,
        label=loaded.label,
        meta=loaded.meta,
        image_ext=loaded.image_ext,
    )


def card_fingerprint(card: DatasetCard, scans: dict[str, SplitScan], options: dict[str, Any]) -> str:
    """Hash of what determines the output: the card's bytes, the options, each pair's files and sizes."""
    listing = [
        [s.split, s.key, s.image.describe(), s.image.size(), s.label.describe(), s.label.size()]
        for scan in scans.values()
        for s in scan.samples
    ]
    unpaired = {
        split: [scan.images_without_label, scan.labels_without_image] for split, scan in scans.items()
    }
    payload = {
        "format_version": FORMAT_VERSION,
        "card_sha256": card.sha256,
        "options": options,
        "samples": listing,
        "unpaired": unpaired,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _check_pairs(card: DatasetCard, scans: dict[str, SplitScan], *, skip_unpaired: bool) -> None:
    empty = [scan for scan in scans.values() if not scan.samples]
    if empty:
        scan = empty[0]
        found = f"; {scan.unpaired_text()}" if scan.unpaired else ""
        raise UnpairedFilesError(
            f"{card.path}: splits.{scan.split}: no image-label pair ({scan.where}; image suffixes "
            f"{', '.join(card.image_suffixes)}, label suffix {card.label_suffix}){found}"
        )
    unpaired = [scan for scan in scans.values() if scan.unpaired]
    if not unpaired:
        return
    text = "; ".join(f"{scan.split}: {scan.unpaired_text()}" for scan in unpaired)
    if not skip_unpaired:
        raise UnpairedFilesError(
            f"{card.path}: files without a partner: {text} (add the missing files, or --skip-unpaired to "
            "skip them; they are then recorded in index.json)"
        )
    log.warning("skipping files without a partner: %s", text)


def prepare_card(
    card: str | Path | DatasetCard,
    out: str | Path,
    *,
    splits: Sequence[Split] = SPLITS,
    skip_unpaired: bool = False,
    skip_corrupt: bool = False,
    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
    limit: int | None = None,
    workers: int = 0,
    force: bool = False,
) -> PrepareReport:
    """Write validated shards of the dataset ``card`` describes into ``out``.

    Args:
        card: the card file (or a loaded card).
        out: destination folder (replaced atomically; never inside a folder the card reads).
        splits: which splits to prepare.
        skip_unpaired: skip (and record) images without a label map and label maps without an image instead
            of failing.
        skip_corrupt: skip (and record) unreadable files and label maps the card does not map instead of failing.
        samples_per_shard: samples per shard file.
        limit: keep only the first ``limit`` pairs (by key) of each split.
        workers: reader processes (0: read in this process).
        force: rebuild even when ``out`` is up to date, and replace an ``out`` vitadapter did not write.

    Returns:
        The report; ``reused`` tells whether the existing folder was kept.

    Raises:
        CardError: an invalid card. UnpairedFilesError: files without a partner (unless ``skip_unpaired``), or a
        split without any pair. CorruptFileError, LabelError: a bad file or a label value the card does not
        map, naming the file (unless ``skip_corrupt``).
    """
    card = card if isinstance(card, DatasetCard) else load_card(card)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    out = Path(out)
    for folder in _read_folders(card):
        check_disjoint(folder, out)
    if out.resolve() in card.path.resolve().parents:
        raise ForeignFolderError(
            f"the output folder {out} holds the card {card.path}: choose a folder outside it"
        )
    check_replaceable(out, force=force)
    info = register_dataset(card.info())
    scans = {split: scan_split(card, split) for split in splits}
    _check_pairs(card, scans, skip_unpaired=skip_unpaired)
    for scan in scans.values():
        scan.samples = scan.samples[:limit]
    options = {
        "splits": list(splits),
        "skip_unpaired": skip_unpaired,
        "skip_corrupt": skip_corrupt,
        "samples_per_shard": samples_per_shard,
        "limit": limit,
    }
    fingerprint = card_fingerprint(card, scans, options)
    existing = None if force else existing_index(out)
    if existing is not None and existing.inputs_fingerprint == fingerprint and existing.card is not None:
        log.info("%s is complete and up to date; nothing to do", out)
        return PrepareReport(root=out, index=existing, reused=True)
    skipped = {
        split: [{"key": name, "file": name, "reason": UNPAIRED_IMAGE} for name in scan.images_without_label]
        + [{"key": name, "file": name, "reason": UNPAIRED_LABEL} for name in scan.labels_without_image]
        for split, scan in scans.items()
    }
    load = functools.partial(_load_card, rule=card.rule)
    loaded = {
        split: (load_all(scan.samples, workers, load), len(scan.samples)) for split, scan in scans.items()
    }
    index = write_prepared(
        out,
        dataset=card.name,
        info=info,
        loaded=loaded,
        skip_corrupt=skip_corrupt,
        samples_per_shard=samples_per_shard,
        fingerprint=fingerprint,
        source=lambda: describe_card(card),
        force=force,
        card=card.index_record(),
        skipped=skipped,
    )
    return PrepareReport(root=out, index=index, reused=False)


def _read_folders(card: DatasetCard) -> list[Path]:
    folders: list[Path] = []
    for source in card.splits.values():
        if isinstance(source, ParquetSplit):
            folders += [p.parent for p in source.files]
        else:
            folders += [source.images, source.labels]
    return folders
