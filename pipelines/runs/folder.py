"""A run folder, and every decision about it: which checkpoint is latest and best, what a later run
starts from, whether the folder belongs to the run's present definition (resume) or not (moved aside).

Layout (written by :class:`pipelines.engine.checkpoints.CheckpointManager` and the trainer)::

    iter_0001000.pth     iteration checkpoints (the latest K kept); latest.json names the newest
    best_mIoU.pth        the best evaluation so far; best.json says which iteration and score
    run_signature.json   the hash of the run's training definition
    train_log.jsonl      one JSON record per log interval (the last one says why a failed run stopped)
    skipped_samples.jsonl  the corrupt samples skipped with --skip-corrupt (iteration, shard, key, reason)
    config.json          the resolved zoo entry; key_report.json: what was loaded into the model

What decides what (the one table, also in README "What reruns what"):

* DVC reruns ``train_<run>`` when a parameter of the run's training definition changes (the keys of
  :data:`pipelines.config.params.TRAINING_KEYS` and the weight-defining knobs of
  :func:`pipelines.config.knobs.weight_defining_knobs`), and ``evaluate_<run>`` when ``eval`` changes;
* Prefect's cache key of a stage task hashes the same definition (plus the flow run), so an evaluation
  setting never invalidates a training task;
* the run signature (the hash of that definition) decides, when a training stage starts, whether the run
  folder is resumed (same signature) or belongs to another definition: then it is moved aside to
  ``<folder>.stale-<time>`` (kept, named in the log), never deleted.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from data.atomic import TMP_SUFFIX, write_json_atomic

log = logging.getLogger(__name__)

ITER_FILE = re.compile(r"^iter_(\d+)\.pth$")
LATEST = "latest.json"
BEST = "best_mIoU.pth"
BEST_INFO = "best.json"
SIGNATURE_FILE = "run_signature.json"
TRAIN_LOG = "train_log.jsonl"
EVAL_LOG = "eval_log.jsonl"  # one record per evaluation during training
SKIPPED_SAMPLES = "skipped_samples.jsonl"  # corrupt samples skipped during training (--skip-corrupt)
CONFIG_FILE = "config.json"
KEY_REPORT = "key_report.json"
STALE_SUFFIX = ".stale-"

LOCK_FILE = ".lock"
Which = Literal["best", "last"]

# the lock files this process holds: a forked child (a data-loader worker) closes its copies at once, so the
# lock goes with this process's own close and never lives on in a child (flock: released when every copy
# of the descriptor is closed)
_HELD_LOCKS: set[int] = set()


def _close_inherited_locks() -> None:
    for descriptor in _HELD_LOCKS:
        with contextlib.suppress(OSError):
            os.close(descriptor)
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


class RunFolderBusyError(RuntimeError):
    """Another process is writing the run folder; the message names the folder and that process."""


def signature_of(definition: Any) -> str:
    """sha256 of a JSON-able definition (keys sorted, so the order of a mapping does not matter)."""
    return hashlib.sha256(json.dumps(definition, sort_keys=True, default=str).encode()).hexdigest()


class RunFolder:
    """The folder of one training run.

    Args:
        path: the folder (need not exist yet).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # -- checkpoints ---------------------------------------------------------------------------------
    def iteration_checkpoints(self) -> list[tuple[int, Path]]:
        """(iteration, path) of the iteration checkpoints present, oldest first."""
        if not self.path.is_dir():
            return []
        found = []
        for child in self.path.iterdir():
            match = ITER_FILE.match(child.name)
            if match:
                found.append((int(match.group(1)), child))
        return sorted(found)

    def latest_checkpoint(self) -> Path | None:
        """The newest complete iteration checkpoint (``latest.json``'s, else the highest), or None."""
        pointer = self.path / LATEST
        if pointer.is_file():
            try:
                name = json.loads(pointer.read_text())["file"]
                if (self.path / name).is_file():
                    return self.path / name
            except (json.JSONDecodeError, KeyError, TypeError):
                log.warning("%s is unreadable; looking for checkpoints directly", pointer)
        files = self.iteration_checkpoints()
        return files[-1][1] if files else None

    def latest_iteration(self) -> int | None:
        """The iteration of the newest complete checkpoint (``latest.json``, else the file names), or None."""
        latest = self.latest_checkpoint()
        match = ITER_FILE.match(latest.name) if latest is not None else None
        return int(match.group(1)) if match else None

    def best_checkpoint(self) -> Path | None:
        """The best-mIoU checkpoint, or None when no evaluation has run."""
        path = self.path / BEST
        return path if path.is_file() else None

    def best_score(self) -> float | None:
        """The score ``best.json`` records for the best checkpoint (None: none, or unreadable)."""
        info = self.path / BEST_INFO
        if not info.is_file():
            return None
        try:
            return float(json.loads(info.read_text())["value"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            return None

    def final_checkpoint(self) -> Path:
        """The checkpoint a later run starts from (the strategy-2 hand-off): the newest iteration checkpoint,
        for a finished run the one of its last iteration.

        Not the best one: which checkpoint is best depends on when and on how many images evaluations ran
        (``eval_interval``, ``eval_limit``), which are not part of the training definition, so the starting
        weights of the next run would change without anything retraining (docs/reference.md §R2.2).

        Raises:
            FileNotFoundError: the folder has no iteration checkpoint, naming it.
        """
        latest = self.latest_checkpoint()
        if latest is None:
            raise FileNotFoundError(
                f"run folder {self.path} has no iteration checkpoint: train the run first"
            )
        return latest

    def checkpoint(self, which: Which = "best") -> Path:
        """The checkpoint to evaluate: the best one (``best``; the latest when no evaluation has run) or the
        latest one (``last``). A later run starts from :meth:`final_checkpoint` instead.

        Raises:
            FileNotFoundError: the folder has no checkpoint, naming it.
        """
        found = (self.best_checkpoint() if which == "best" else None) or self.latest_checkpoint()
        if found is None:
            raise FileNotFoundError(f"run folder {self.path} has no checkpoint: train the run first")
        return found

    # -- files ---------------------------------------------------------------------------------------
    @property
    def train_log(self) -> Path:
        return self.path / TRAIN_LOG

    def read_log(self) -> list[dict[str, Any]]:
        """The training log's records (a torn last line, from a kill mid-write, is skipped)."""
        return self.read_records(TRAIN_LOG)

    def read_records(self, name: str) -> list[dict[str, Any]]:
        """The records of the JSON-lines file ``name`` of the folder (a torn last line is skipped)."""
        path = self.path / name
        if not path.is_file():
            return []
        records = []
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if number == len(lines):
                    log.warning("%s: skipping the torn last line %d", path, number)
                    continue
                raise ValueError(f"{path}: line {number} is not JSON") from None
        return records

    # -- one writer ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold an exclusive lock on the folder for the block (one writer per run folder).

        The lock is an ``flock`` on ``.lock`` in the folder, released by the operating system when the
        process dies, so a killed run never leaves the folder locked.

        Raises:
            RunFolderBusyError: another process holds it, naming the folder and that process's PID.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        lock_path = self.path / LOCK_FILE
        handle = lock_path.open("a+")
        try:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                raise RunFolderBusyError(
                    f"run folder {self.path} is in use by another process (PID {holder}): wait for it to "
                    "finish, or stop it, or use another --work-dir"
                ) from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            _HELD_LOCKS.add(handle.fileno())
            yield
        finally:
            _HELD_LOCKS.discard(handle.fileno())
            handle.close()  # releases the lock

    def remove_orphaned_temporaries(self) -> list[Path]:
        """Delete the temporary files of atomic writes a killed run left in the folder (its own files only)."""
        if not self.path.is_dir():
            return []
        removed = [p for p in self.path.glob(".*" + TMP_SUFFIX) if p.is_file()]
        for path in removed:
            path.unlink(missing_ok=True)
        if removed:
            log.info("removed %d temporary file(s) a killed run left in %s", len(removed), self.path)
        return removed

    def read_eval_log(self) -> list[dict[str, Any]]:
        """The evaluations during training, one per iteration (the last record of an iteration wins: a
        resumed run repeats the evaluations after its checkpoint)."""
        path = self.path / EVAL_LOG
        if not path.is_file():
            return []
        by_iteration: dict[int, dict[str, Any]] = {}
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a kill
            by_iteration[int(record["iteration"])] = record
        return [by_iteration[i] for i in sorted(by_iteration)]

    # -- signature and resume ------------------------------------------------------------------------
    def recorded_signature(self) -> str | None:
        marker = self.path / SIGNATURE_FILE
        if not marker.is_file():
            return None
        try:
            return json.loads(marker.read_text()).get("signature")
        except (json.JSONDecodeError, AttributeError):
            return None

    def prepare_for(self, signature: str, *, run: str) -> Path | None:
        """Make the folder the home of the run with ``signature``: resume it if it was written for the same
        definition; move it aside if it holds anything else. Returns where it was moved, or None.
        """
        moved = None
        if self.path.is_dir() and any(p.name != LOCK_FILE for p in self.path.iterdir()):
            recorded = self.recorded_signature()
            if recorded != signature:
                moved = self.path.with_name(f"{self.path.name}{STALE_SUFFIX}{time.strftime('%Y%m%d-%H%M%S')}")
                os.replace(self.path, moved)
                log.warning(
                    "the training definition of run %s changed since %s was written: moved it aside to %s "
                    "(kept; delete it yourself when it is no longer needed) and starting afresh",
                    run,
                    self.path,
                    moved,
                )
        self.path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path / SIGNATURE_FILE, {"signature": signature, "run": run})
        return moved
