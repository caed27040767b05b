"""Turn an official distribution (or its synthetic twin) into validated webdataset shards.

``prepare_dataset`` reads every sample with :mod:`data.readers` (checking images and labels, converting labels
to train ids), writes the shards and ``index.json`` with :mod:`data.shards` into a staging folder, validates
the result, and only then moves it into place (:mod:`data.atomic`). Re-running with the same inputs and options
is a no-op when the existing folder is complete and its checksums hold; the same inputs always give the same
bytes. A corrupt raw image or label stops the run with an error naming the file, or, with
``skip_corrupt=True``, is skipped and recorded in the index.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from data.atomic import atomic_directory, check_disjoint, check_replaceable
from data.catalog import SPLITS, DatasetInfo, DatasetName, LabelError, Split, get_dataset
from data.provenance import describe_raw
from data.readers import CorruptFileError, FileRef, RawSample, find_samples, load_sample
from data.shards import (
    DEFAULT_SAMPLES_PER_SHARD,
    FORMAT_VERSION,
    INDEX_FILE,
    DatasetIndex,
    IncompleteDatasetError,
    PreparedDataset,
    SplitWriter,
    validate_prepared,
)

log = logging.getLogger(__name__)

WORKER_CHUNK = 8


@dataclass(frozen=True)
class PrepareReport:
    """Outcome of :func:`prepare_dataset`.

    Attributes:
        root: the prepared folder.
        index: its ``index.json`` contents.
        reused: ``True`` when an existing complete folder with the same inputs was kept as is.
    """

    root: Path
    index: DatasetIndex
    reused: bool


@dataclass(frozen=True)
class LoadedItem:
    """What a worker sends back: everything the writer needs, or the reason the sample is unusable."""

    key: str
    error: str | None = None
    error_type: str = ""
    image_bytes: bytes = b""
    label: np.ndarray | None = None
    meta: dict[str, Any] | None = None
    image_ext: str = "jpg"


def _load(sample: RawSample) -> LoadedItem:
    try:
        loaded = load_sample(sample)
    except (CorruptFileError, LabelError) as err:
        return LoadedItem(key=sample.key, error=str(err), error_type=type(err).__name__)
    height, width = loaded.label.shape
    meta = {
        "key": sample.key,
        "split": sample.split,
        "height": height,
        "width": width,
        "image_file": sample.image.name,
        "label_file": sample.label.name,
        "label_encoding": sample.encoding,
    }
    image_ext = Path(sample.image.name).suffix.lstrip(".") or "jpg"
    return LoadedItem(
        key=sample.key, image_bytes=loaded.image_bytes, label=loaded.label, meta=meta, image_ext=image_ext
    )


def load_all(
    samples: Sequence[Any], workers: int, load: Callable[[Any], LoadedItem] = _load
) -> Iterator[LoadedItem]:
    """Load samples in order, in ``workers`` processes (in this process when 0)."""
    if workers <= 0:
        yield from map(load, samples)
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        yield from pool.map(load, samples, chunksize=WORKER_CHUNK)


def write_prepared(
    out: Path,
    *,
    dataset: str,
    info: DatasetInfo,
    loaded: dict[str, tuple[Iterator[LoadedItem], int]],
    skip_corrupt: bool,
    samples_per_shard: int,
    fingerprint: str,
    source: Callable[[], dict[str, Any]],
    force: bool,
    card: dict[str, Any] | None = None,
    skipped: dict[str, list[dict[str, str]]] | None = None,
) -> DatasetIndex:
    """Write the loaded samples of each split as shards and ``index.json`` into a staging folder, validate it,
    and move it to ``out`` (``skipped``: entries recorded before any sample, e.g. unpaired files)."""
    with atomic_directory(out, writer="vitadapter data prepare", force=force) as staging:
        split_indexes = {}
        for split, (items, total) in loaded.items():
            writer = SplitWriter(
                staging, split, num_classes=info.num_classes, samples_per_shard=samples_per_shard
            )
            writer.index.skipped.extend((skipped or {}).get(split, []))
            for item in tqdm(items, total=total, desc=f"{dataset} {split}", unit="img"):
                if item.error is not None:
                    if not skip_corrupt:
                        error_type = (
                            LabelError if item.error_type == LabelError.__name__ else CorruptFileError
                        )
                        raise error_type(f"{item.error} (use --skip-corrupt to skip such samples)")
                    log.warning("skipping corrupt sample %s: %s", item.key, item.error)
                    writer.index.skipped.append({"key": item.key, "reason": item.error})
                    continue
                assert item.label is not None and item.meta is not None  # set when there is no error
                writer.write(
                    key=item.key,
                    image_bytes=item.image_bytes,
                    image_ext=item.image_ext,
                    label=item.label,
                    meta={**item.meta, "dataset": dataset},
                )
                encoding = item.meta["label_encoding"]
                writer.index.encodings[encoding] = writer.index.encodings.get(encoding, 0) + 1
            split_indexes[split] = writer.close()
            log.info(
                "%s %s: %d samples in %d shards, %d skipped",
                dataset,
                split,
                split_indexes[split].num_samples,
                len(split_indexes[split].shards),
                len(split_indexes[split].skipped),
            )
        index = DatasetIndex(
            dataset=dataset,
            num_classes=info.num_classes,
            class_names=list(info.class_names),
            ignore_index=info.ignore_index,
            label_convention=info.label_convention,
            splits=split_indexes,
            inputs_fingerprint=fingerprint,
            source=source(),
            card=card,
        )
        (staging / INDEX_FILE).write_text(index.to_json())
        validate_prepared(staging)
    return index


def _size(ref: FileRef) -> int:
    """File size, or -1 for a missing file (reported as corrupt when the sample is loaded)."""
    try:
        return ref.size()
    except FileNotFoundError:
        return -1


def inputs_fingerprint(dataset: str, samples: dict[str, list[RawSample]], options: dict[str, Any]) -> str:
    """Hash of what determines the output: dataset, options, and each sample's files and sizes."""
    listing = [
        [s.split, s.key, s.image.name, _size(s.image), s.label.name, _size(s.label), s.encoding]
        for split_samples in samples.values()
        for s in split_samples
    ]
    payload = {"format_version": FORMAT_VERSION, "dataset": dataset, "options": options, "samples": listing}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def existing_index(out: Path) -> DatasetIndex | None:
    if not (out / INDEX_FILE).exists():
        if out.exists() and any(out.iterdir()):
            log.warning("%s has no %s: not a complete prepared folder", out, INDEX_FILE)
        return None
    try:
        return PreparedDataset.open(out, verify="sha256").index
    except IncompleteDatasetError as err:
        log.warning("existing output not trusted (%s); rebuilding it", err)
        return None


def prepare_dataset(
    dataset: DatasetName,
    raw: str | Path,
    out: str | Path,
    *,
    splits: Sequence[Split] = SPLITS,
    skip_corrupt: bool = False,
    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
    limit: int | None = None,
    workers: int = 0,
    force: bool = False,
) -> PrepareReport:
    """Write validated shards of ``dataset`` found under ``raw`` into ``out``.

    Args:
        dataset: catalog name.
        raw: folder with the downloaded archives or extracted folders (or a synthetic twin).
        out: destination folder (replaced atomically).
        splits: which splits to prepare.
        skip_corrupt: skip (and record in the index) corrupt images and labels instead of failing.
        samples_per_shard: samples per shard file.
        limit: keep only the first ``limit`` samples (by key) of each split, for quick runs.
        workers: reader processes (0: read in this process).
        force: rebuild even when ``out`` is complete and was made from the same inputs, and replace an
            ``out`` that vitadapter did not write (otherwise refused, :func:`data.atomic.check_replaceable`).

    Returns:
        The report; ``reused`` tells whether the existing folder was kept.

    Raises:
        DatasetNotFoundError: the dataset is not under ``raw`` (the message says what to download).
        CorruptFileError, LabelError: a bad raw file, naming it (unless ``skip_corrupt``).
    """
    info = get_dataset(dataset)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    out = Path(out)
    check_disjoint(raw, out)
    check_replaceable(out, force=force)
    samples = {split: find_samples(dataset, raw, split)[:limit] for split in splits}
    options = {
        "splits": list(splits),
        "skip_corrupt": skip_corrupt,
        "samples_per_shard": samples_per_shard,
        "limit": limit,
    }
    fingerprint = inputs_fingerprint(dataset, samples, options)
    existing = None if force else existing_index(out)
    if existing is not None and existing.inputs_fingerprint == fingerprint and existing.source is not None:
        log.info("%s is complete and up to date; nothing to do", out)
        return PrepareReport(root=out, index=existing, reused=True)

    loaded = {
        split: (load_all(split_samples, workers), len(split_samples))
        for split, split_samples in samples.items()
    }
    index = write_prepared(
        out,
        dataset=dataset,
        info=info,
        loaded=loaded,
        skip_corrupt=skip_corrupt,
        samples_per_shard=samples_per_shard,
        fingerprint=fingerprint,
        source=lambda: describe_raw(raw, (s for split_samples in samples.values() for s in split_samples)),
        force=force,
    )
    return PrepareReport(root=out, index=index, reused=False)
