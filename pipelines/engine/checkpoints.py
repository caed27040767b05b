"""Training checkpoints: atomic, the latest K kept, resumable, plus the best-mIoU checkpoint.

Every checkpoint is written to a temporary file in the run folder and renamed into place
(``iter_0001000.pth``); ``latest.json`` names the newest and is itself replaced atomically, so a
run killed at any moment resumes from the last complete checkpoint. The model weights are stored
under ``state_dict`` in the official layout, so any checkpoint here is also accepted wherever an
official checkpoint is.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from data.atomic import atomic_write, write_json_atomic
from models.checkpoint import CheckpointError, load_checkpoint_file
from pipelines.runs.folder import BEST, BEST_INFO, LATEST, RunFolder

log = logging.getLogger(__name__)


def save_checkpoint_file(obj: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``obj`` with ``torch.save`` atomically (:func:`data.atomic.atomic_write`)."""
    return atomic_write(path, lambda handle: torch.save(dict(obj), handle))


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
        """Write the checkpoint of ``iteration`` (completed iterations), update ``latest.json``, prune."""
        path = save_checkpoint_file(state, self.work_dir / f"iter_{iteration:07d}.pth")
        write_json_atomic(self.work_dir / LATEST, {"iteration": iteration, "file": path.name})
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
        """Replace the best checkpoint and record which iteration and score it holds."""
        path = save_checkpoint_file(state, self.work_dir / BEST)
        write_json_atomic(
            self.work_dir / BEST_INFO, {"iteration": iteration, "metric": metric, "value": value}
        )
        return path

    def best_score(self) -> float | None:
        return self.folder.best_score()
