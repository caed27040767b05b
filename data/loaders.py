"""Torch loaders over prepared shards: an infinite training stream and an exact-once evaluation reader.

Training (:class:`TrainStream`, :func:`build_train_loader`): an endless sequence of batches, resampled from the
split without replacement pass after pass. The global sample sequence is ``G[t] = perm_e[t mod N]`` with
``e = t div N`` and ``perm_e`` a permutation drawn from ``(seed, e)``. Rank ``r`` of ``R`` takes positions
``t = r, r + R, r + 2R, ...``, so ranks see disjoint samples within every pass, and its batch ``b`` holds its
positions ``b * B .. (b + 1) * B - 1``. The augmentation of position ``t`` uses a generator seeded by
``(seed, t)``. The rank's stream is thus a pure function of ``(seed, rank, world_size, batch_size)``: loader
workers only share the work (worker ``w`` of ``W`` builds batches ``start_step + w, start_step + w + W, ...``,
and the torch ``DataLoader`` returns them in order), so each worker sees different samples, and the number of
workers changes nothing. Resuming after ``k`` batches is ``start_step=k``.

Gradient accumulation (``micro_batches=M``): each step yields a list of ``M`` batches, micro-batch ``j`` of
rank ``r`` being what rank ``r * M + j`` of ``R * M`` ranks would read. One process with ``M`` accumulation
steps thus sees exactly the samples, grouped into the same batches, as ``M`` processes without accumulation
(BatchNorm statistics are those of ``M`` processes with per-process BatchNorm, not the reference's SyncBN over
all of them: ``pipelines.engine.plan`` avoids accumulation by default). Batches: ``image`` float32
``(B, 3, H, W)``, ``label`` int64 ``(B, H, W)``, ``keys``, and with ``to_mask`` the Mask2Former targets.

Evaluation (:class:`EvalDataset`, :func:`build_eval_loader`): rank ``r`` of ``R`` reads positions
``r, r + R, ...`` of the validation split, so every sample is visited exactly once across ranks (no padding:
ranks may get one sample more or less). Each item is the decoded image at its original size (``(H, W, 3)``
uint8 BGR), its train-id label map and metadata, plus the test views when a :class:`TestPipeline` is given.

A corrupt sample (:class:`data.shards.CorruptSampleError`: a shard truncated or damaged after preparation) is
an error in the main process naming the shard and the key, never a worker's traceback: the worker hands it
over as a record and :class:`ShardLoader` raises it. With ``skip_corrupt`` a training sample that cannot be
read is replaced by the next readable one of the split (deterministic: the stream stays a pure function of
the step) and the batch lists it under ``skipped``; an evaluation sample is left out and listed in
:attr:`ShardLoader.skipped`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate, get_worker_info

from data.eval_transforms import TestPipeline
from data.shards import (
    CorruptSampleError,
    IncompleteDatasetError,
    PreparedDataset,
    PreparedSplit,
    VerifyLevel,
)
from data.train_transforms import TrainPipeline

log = logging.getLogger(__name__)

PERMUTATION_SALT = 0x5EED_0001
AUGMENTATION_SALT = 0x5EED_0002
PERMUTATION_CACHE = 4
# the records a worker hands over instead of a batch or an item (plain dicts: they pickle)
CORRUPT_SAMPLE = "corrupt_sample"
SKIPPED_SAMPLE = "skipped_sample"


def resolve_distributed(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """``(rank, world_size)``: the given values, else torch.distributed's when initialised, else ``(0, 1)``."""
    if rank is None or world_size is None:
        initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
        rank = rank if rank is not None else (torch.distributed.get_rank() if initialised else 0)
        world_size = (
            world_size
            if world_size is not None
            else (torch.distributed.get_world_size() if initialised else 1)
        )
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    return rank, world_size


@functools.lru_cache(maxsize=PERMUTATION_CACHE)
def epoch_permutation(seed: int, epoch: int, num_samples: int) -> np.ndarray:
    """The order of pass ``epoch`` over ``num_samples`` samples."""
    return np.random.default_rng([PERMUTATION_SALT, seed, epoch]).permutation(num_samples)


def stream_sample(seed: int, position: int, num_samples: int) -> int:
    """Sample index at global position ``position`` of the resampled sequence."""
    epoch, offset = divmod(position, num_samples)
    return int(epoch_permutation(seed, epoch, num_samples)[offset])


def collate_train(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack pipeline outputs into a batch.

    Returns:
        ``image`` float32 ``(B, 3, H, W)``, ``label`` int64 ``(B, H, W)``, ``keys`` list of str, when present
        ``gt_labels`` (list of int64 ``(N_i,)``) and ``gt_masks`` (list of bool ``(N_i, H, W)``), and
        ``skipped`` (the corrupt samples replaced, records of :meth:`CorruptSampleError.to_record`).
    """
    # default_collate stacks straight into shared memory inside a loader worker, so sending the batch to the
    # main process costs no further copy.
    batch: dict[str, Any] = {
        "image": default_collate([torch.from_numpy(s["image"]) for s in samples]),
        "label": default_collate([torch.from_numpy(s["label"].astype(np.int64)) for s in samples]),
        "keys": [s["key"] for s in samples],
    }
    if "gt_labels" in samples[0]:
        batch["gt_labels"] = [torch.from_numpy(s["gt_labels"]) for s in samples]
        batch["gt_masks"] = [torch.from_numpy(s["gt_masks"]) for s in samples]
    skipped = [record for s in samples for record in s.get("skipped", ())]
    if skipped:
        batch["skipped"] = skipped
    return batch


class TrainStream(IterableDataset):
    """Infinite, resampled, augmented training batches of one rank (see the module docstring).

    Args:
        split: the prepared training split.
        pipeline: the training transform.
        batch_size: samples per batch (per rank).
        seed: base seed of the order and of the augmentations.
        rank: this process's rank.
        world_size: number of ranks.
        start_step: steps this rank already consumed (resume point).
        micro_batches: batches per step (gradient accumulation); with more than one, each item is a list.
        skip_corrupt: replace a sample that cannot be read by the next readable one (listed in the batch's
            ``skipped``) instead of handing over the error.
    """

    def __init__(
        self,
        split: PreparedSplit,
        pipeline: TrainPipeline,
        *,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        micro_batches: int = 1,
        skip_corrupt: bool = False,
    ) -> None:
        super().__init__()
        if micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
        if batch_size < 1 or start_step < 0 or seed < 0:
            raise ValueError(
                f"need batch_size >= 1, start_step >= 0 and seed >= 0, got {batch_size}, {start_step} and {seed}"
            )
        if len(split) == 0:
            raise ValueError(f"{split.root}: split {split.split} is empty")
        self.split = split
        self.pipeline = pipeline
        self.batch_size = batch_size
        self.seed = seed
        self.rank, self.world_size = resolve_distributed(rank, world_size)
        self.start_step = start_step
        self.micro_batches = micro_batches
        self.skip_corrupt = skip_corrupt

    def batch_positions(self, step: int, micro: int = 0) -> list[int]:
        """Global positions of micro-batch ``micro`` of this rank's step ``step``."""
        first = step * self.batch_size
        virtual_rank = self.rank * self.micro_batches + micro
        virtual_world = self.world_size * self.micro_batches
        return [virtual_rank + j * virtual_world for j in range(first, first + self.batch_size)]

    def batch(self, step: int, micro: int = 0) -> dict[str, Any]:
        """Micro-batch ``micro`` of this rank's step ``step``, collated (see :func:`collate_train`)."""
        return collate_train([self.sample(t) for t in self.batch_positions(step, micro)])

    def step_batches(self, step: int) -> list[dict[str, Any]]:
        """The ``micro_batches`` batches of step ``step``."""
        return [self.batch(step, micro) for micro in range(self.micro_batches)]

    def sample(self, position: int) -> dict[str, Any]:
        """Read, decode and augment the sample at global position ``position``.

        Raises:
            CorruptSampleError: it cannot be read (without ``skip_corrupt``; with it, the next readable
                sample of the split takes its place, augmented as position ``position``).
        """
        index = stream_sample(self.seed, position, len(self.split))
        try:
            return self._read(index, position)
        except CorruptSampleError as err:
            if not self.skip_corrupt:
                raise
            failure = err
        for step in range(1, len(self.split)):
            try:
                item = self._read((index + step) % len(self.split), position)
            except CorruptSampleError:
                continue
            return {**item, "skipped": [{**failure.to_record(), "replaced_by": item["key"]}]}
        raise IncompleteDatasetError(f"{self.split.root}: no sample of split {self.split.split} can be read")

    def _read(self, index: int, position: int) -> dict[str, Any]:
        record = self.split.record(index)
        image, label = record.decode()
        rng = np.random.default_rng([AUGMENTATION_SALT, self.seed, position])
        return {**self.pipeline(image, label, rng), "key": record.key}

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # The DataLoader asks workers in turn, starting with worker 0, so batches come back in step order.
        step = self.start_step + worker
        while True:
            try:
                yield self.batch(step) if self.micro_batches == 1 else self.step_batches(step)
            except CorruptSampleError as err:  # handed over: ShardLoader raises it in the main process
                yield {CORRUPT_SAMPLE: err.to_record()}
                return
            step += num_workers


class ShardLoader(DataLoader):
    """A ``DataLoader`` that raises the corrupt sample a worker handed over (one line naming the shard and the
    key, not the worker's traceback) and leaves out the evaluation samples skipped with ``skip_corrupt``.

    Attributes:
        skipped: the records of the samples left out so far (:meth:`CorruptSampleError.to_record`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.skipped: list[dict[str, Any]] = []

    def __iter__(self) -> Iterator[Any]:
        with _opencv_pool_stopped(self.num_workers > 0):
            iterator = super().__iter__()  # forks the workers
        error = None
        try:
            for item in iterator:
                if isinstance(item, dict) and CORRUPT_SAMPLE in item:
                    error = CorruptSampleError.from_record(item[CORRUPT_SAMPLE])
                    break
                if isinstance(item, dict) and SKIPPED_SAMPLE in item:
                    self.skipped.append(item[SKIPPED_SAMPLE])
                    log.warning(
                        "skipped a corrupt sample (--skip-corrupt): %s", item[SKIPPED_SAMPLE]["message"]
                    )
                    continue
                yield item
        finally:
            # the worker processes stop here, when iterating ends or is closed: not later, when a traceback
            # that holds this frame is let go
            del iterator
        if error is not None:
            raise error


def open_prepared(root: str | Path, *, verify: VerifyLevel, skip_corrupt: bool) -> PreparedDataset:
    """Open a shard folder; with ``skip_corrupt`` a shard that no longer matches the index is a warning (its
    unreadable samples are skipped as they are met) instead of an error."""
    try:
        return PreparedDataset.open(root, verify=verify)
    except CorruptSampleError as err:
        if not skip_corrupt:
            raise
        log.warning("%s (--skip-corrupt: its unreadable samples will be skipped)", err)
        return PreparedDataset.open(root, verify="none")


@contextlib.contextmanager
def _opencv_pool_stopped(forking: bool) -> Iterator[None]:
    """OpenCV's thread pool does not survive ``fork``: a worker forked while the pool's threads exist holds a
    pool whose threads are gone, and its first ``cv2.setNumThreads`` (or parallel call) waits for them forever
    (seen as a hung DataLoader after an earlier evaluation in the same process had started the pool). So the
    pool is shrunk to one thread (its workers joined) while the loader forks, and restored after; the forked
    workers keep the single-threaded setting, one worker process per core."""
    if not forking:
        yield
        return
    previous = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(previous)


def _worker_init(_: int) -> None:
    # One worker process per core: keep torch from starting a thread pool of its own (OpenCV's is one
    # thread already, set before the fork: _opencv_pool_stopped).
    torch.set_num_threads(1)


def build_train_loader(
    root: str | Path,
    pipeline: TrainPipeline,
    *,
    batch_size: int,
    seed: int,
    split: str = "train",
    rank: int | None = None,
    world_size: int | None = None,
    num_workers: int = 2,
    start_step: int = 0,
    micro_batches: int = 1,
    pin_memory: bool = False,
    verify: VerifyLevel = "size",
    skip_corrupt: bool = False,
) -> ShardLoader:
    """A ``DataLoader`` over :class:`TrainStream` (infinite; iterate it once).

    Args:
        root: prepared dataset folder.
        pipeline: training transform.
        batch_size: samples per batch per rank.
        seed: base seed.
        split: split name.
        rank: rank (default: torch.distributed's, or 0).
        world_size: number of ranks (default: torch.distributed's, or 1).
        num_workers: loader processes (0: in this process).
        start_step: steps already consumed by this rank (resume).
        micro_batches: batches per step (gradient accumulation); each item is then a list of batches.
        pin_memory: pin batches for faster host-to-GPU copies.
        verify: how the shard folder is checked when opened.
        skip_corrupt: replace the samples that cannot be read (see :class:`TrainStream`).
    """
    rank, world_size = resolve_distributed(rank, world_size)
    dataset = open_prepared(root, verify=verify, skip_corrupt=skip_corrupt)
    stream = TrainStream(
        dataset.split(split),
        pipeline,
        batch_size=batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        start_step=start_step,
        micro_batches=micro_batches,
        skip_corrupt=skip_corrupt,
    )
    return ShardLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        worker_init_fn=_worker_init if num_workers > 0 else None,
    )


def rank_positions(num_samples: int, rank: int, world_size: int) -> range:
    """Positions rank ``rank`` of ``world_size`` evaluates: ``rank, rank + world_size, ...``."""
    return range(rank, num_samples, world_size)


class EvalDataset(Dataset):
    """The validation samples of one rank at their original size (see the module docstring).

    Args:
        split: the prepared split.
        rank: this process's rank.
        world_size: number of ranks.
        pipeline: test transform; when given, each item also holds its ``views``.
        skip_corrupt: a sample that cannot be read becomes a record to leave out instead of an error.
    """

    def __init__(
        self,
        split: PreparedSplit,
        *,
        rank: int = 0,
        world_size: int = 1,
        pipeline: TestPipeline | None = None,
        skip_corrupt: bool = False,
    ) -> None:
        self.split = split
        self.skip_corrupt = skip_corrupt
        self.rank, self.world_size = resolve_distributed(rank, world_size)
        self.pipeline = pipeline
        self.positions = rank_positions(len(split), self.rank, self.world_size)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """``key``, ``image`` ``(H, W, 3)`` uint8 BGR, ``label`` ``(H, W)`` uint8, ``meta``, maybe ``views``; for a
        corrupt sample the record :class:`ShardLoader` raises (or, with ``skip_corrupt``, leaves out)."""
        try:
            record = self.split.record(self.positions[index])
            image, label = record.decode()
        except CorruptSampleError as err:
            return {SKIPPED_SAMPLE if self.skip_corrupt else CORRUPT_SAMPLE: err.to_record()}
        item = {"key": record.key, "image": image, "label": label, "meta": record.meta}
        if self.pipeline is not None:
            item["views"] = self.pipeline.views(image)
        return item


def _keep(item: dict[str, Any]) -> dict[str, Any]:
    return item


def build_eval_loader(
    root: str | Path,
    *,
    split: str = "val",
    rank: int | None = None,
    world_size: int | None = None,
    num_workers: int = 0,
    pipeline: TestPipeline | None = None,
    verify: VerifyLevel = "size",
    skip_corrupt: bool = False,
) -> ShardLoader:
    """A ``DataLoader`` yielding this rank's validation items one by one (numpy arrays, not batched); corrupt
    samples are errors, or with ``skip_corrupt`` left out and listed in its ``skipped``."""
    rank, world_size = resolve_distributed(rank, world_size)
    dataset = EvalDataset(
        open_prepared(root, verify=verify, skip_corrupt=skip_corrupt).split(split),
        rank=rank,
        world_size=world_size,
        pipeline=pipeline,
        skip_corrupt=skip_corrupt,
    )
    return ShardLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_keep,
        worker_init_fn=_worker_init if num_workers > 0 else None,
    )
