"""Training checkpoints: atomic, the latest K kept, resumable, plus the best-mIoU checkpoint.

Every checkpoint is written to a temporary file in the run folder and renamed into place
(``iter_0001000.pth``); ``latest.json`` names the newest and is itself replaced atomically, so a
run killed at any moment resumes from the last complete checkpoint. The model weights are stored
under ``state_dict`` in the official layout, so any checkpoint here is also accepted wherever an
official checkpoint is.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from models.checkpoint import CheckpointError, load_checkpoint_file, save_checkpoint_file

log = logging.getLogger(__name__)

_ITER_FILE = re.compile(r"^iter_(\d+)\.pth$")
LATEST = "latest.json"
BEST = "best_mIoU.pth"
BEST_INFO = "best.json"


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON to ``path`` through a temporary file and a rename."""
    write_text_atomic(path, json.dumps(payload, indent=1) + "\n")


class CheckpointManager:
    """Checkpoints of one run folder.

    Args:
        work_dir: the run folder.
        keep: how many iteration checkpoints to keep (the reference keeps 1).
    """

    def __init__(self, work_dir: str | os.PathLike[str], keep: int = 1) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.work_dir = Path(work_dir)
        self.keep = keep

    def iteration_files(self) -> list[tuple[int, Path]]:
        """(iteration, path) of the iteration checkpoints present, oldest first."""
        if not self.work_dir.is_dir():
            return []
        found = []
        for path in self.work_dir.iterdir():
            match = _ITER_FILE.match(path.name)
            if match:
                found.append((int(match.group(1)), path))
        return sorted(found)

    def save(self, state: dict[str, Any], iteration: int) -> Path:
        """Write the checkpoint of ``iteration`` (completed iterations), update ``latest.json``, prune."""
        path = save_checkpoint_file(state, self.work_dir / f"iter_{iteration:07d}.pth")
        write_json_atomic(self.work_dir / LATEST, {"iteration": iteration, "file": path.name})
        for _, old in self.iteration_files()[: -self.keep]:
            old.unlink(missing_ok=True)
        return path

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None for a fresh run."""
        pointer = self.work_dir / LATEST
        if pointer.is_file():
            try:
                name = json.loads(pointer.read_text())["file"]
                if (self.work_dir / name).is_file():
                    return self.work_dir / name
            except (json.JSONDecodeError, KeyError, TypeError):
                log.warning("%s is unreadable; looking for checkpoints directly", pointer)
        files = self.iteration_files()
        return files[-1][1] if files else None

    def load_latest(self) -> dict[str, Any] | None:
        """Load the newest readable checkpoint (older ones are tried if the newest is unreadable)."""
        candidates = [p for _, p in reversed(self.iteration_files())]
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
        info = self.work_dir / BEST_INFO
        if not info.is_file():
            return None
        try:
            return float(json.loads(info.read_text())["value"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            return None
