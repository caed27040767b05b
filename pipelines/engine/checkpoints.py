"""Training checkpoints: atomic, the latest K kept, resumable, plus the best-mIoU checkpoint.

Every checkpoint is written to a temporary file in the run folder and renamed into place
(``iter_0001000.pth``); ``latest.json`` names the newest and is itself replaced atomically, so a
run killed at any moment resumes from the last complete checkpoint. The model weights are stored
under ``state_dict`` in the official layout, so any checkpoint here is also accepted wherever an
official checkpoint is.

A checkpoint that cannot be written (a full disk) is a :class:`data.atomic.WriteError` naming the file, the
bytes it needs (the tensors' storage, :func:`checkpoint_bytes`) and the space free; the previous checkpoints
and ``latest.json`` are left as they were.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from data.atomic import TMP_SUFFIX, WriteError, atomic_write, write_json_atomic
from models.checkpoint import CheckpointError, load_checkpoint_file
from pipelines.runs.folder import BEST, BEST_INFO, LATEST, RunFolder

log = logging.getLogger(__name__)


# torch.save's zip container: a header and 64-byte alignment per record, the pickle, the central directory
CONTAINER_BYTES_PER_RECORD = 256


def checkpoint_bytes(obj: Any) -> int:
    """About the size ``torch.save(obj)`` writes: every tensor storage once, plus the container's records."""
    seen: dict[int, int] = {}

    def visit(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            seen[storage.data_ptr() or id(storage)] = storage.nbytes()
        elif isinstance(value, Mapping):
            for item in value.values():
                visit(item)
        elif isinstance(value, list | tuple):
            for item in value:
                visit(item)

    visit(obj)
    return sum(seen.values()) + CONTAINER_BYTES_PER_RECORD * (len(seen) + 1)


def save_checkpoint_file(obj: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``obj`` with ``torch.save`` atomically (:func:`data.atomic.atomic_write`).

    Raises:
        data.atomic.WriteError: the disk is full (or another I/O error), naming ``path``, the bytes needed and
            the space free; nothing was replaced.
    """
    state = dict(obj)
    return atomic_write(path, lambda handle: torch.save(state, handle), size_hint=checkpoint_bytes(state))


class CheckpointManager:
    """Writes the checkpoints of one run folder (reading and choosing them is :class:`RunFolder`'s).

    Args:
        work_dir: the run folder.
        keep: how many iteration checkpoints to keep (the reference keeps 1).
    """

    def __init__(self, work_dir: str | os.PathLike[str], keep: int = 1) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.folder = RunFolder(work_dir)
        self.work_dir = self.folder.path
        self.keep = keep

    def save(self, state: dict[str, Any], iteration: int) -> Path:
        """Write the checkpoint of ``iteration`` (completed iterations), update ``latest.json``, prune.

        Raises:
            data.atomic.WriteError: the checkpoint or ``latest.json`` could not be written; the folder holds
                what it held before (a checkpoint ``latest.json`` could not name is removed again).
        """
        path = self.work_dir / f"iter_{iteration:07d}.pth"
        existed = path.is_file()
        save_checkpoint_file(state, path)
        try:
            write_json_atomic(self.work_dir / LATEST, {"iteration": iteration, "file": path.name})
        except WriteError:
            if not existed:  # the pointer still names the previous checkpoint: keep the two in step
                path.unlink(missing_ok=True)
            raise
        for _, old in self.folder.iteration_checkpoints()[: -self.keep]:
            old.unlink(missing_ok=True)
        return path

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None for a fresh run."""
        return self.folder.latest_checkpoint()

    def load_latest(self) -> dict[str, Any] | None:
        """Load the newest readable checkpoint (older ones are tried if the newest is unreadable)."""
        candidates = [p for _, p in reversed(self.folder.iteration_checkpoints())]
        latest = self.latest()
        if latest is not None and latest in candidates:
            candidates.remove(latest)
            candidates.insert(0, latest)
        for path in candidates:
            try:
                state = load_checkpoint_file(path)
            except CheckpointError as err:
                log.warning("skipping unreadable checkpoint: %s", err)
                continue
            log.info("resuming from %s", path)
            return state
        return None

    def save_best(self, state: dict[str, Any], iteration: int, metric: str, value: float) -> Path:
        """Replace the best checkpoint and record which iteration and score it holds.

        The new checkpoint is written under a temporary name first, then ``best.json``, then the checkpoint is
        renamed into place: a write that fails leaves the previous pair (file and score) as it was.

        Raises:
            data.atomic.WriteError: the checkpoint or ``best.json`` could not be written.
        """
        path = self.work_dir / BEST
        try:
            pending = save_checkpoint_file(state, self.work_dir / f".{BEST}.pending{TMP_SUFFIX}")
        except WriteError as err:
            raise err.naming(path) from err
        try:
            write_json_atomic(
                self.work_dir / BEST_INFO, {"iteration": iteration, "metric": metric, "value": value}
            )
        except WriteError:
            pending.unlink(missing_ok=True)
            raise
        os.replace(pending, path)
        return path

    def best_score(self) -> float | None:
        return self.folder.best_score()
