"""Atomic writes of files and folders: the one module every writer of the project uses.

Files (checkpoints, metrics JSON, reports, logs, downloads, shard indexes): :func:`atomic_write` writes a
temporary file in the destination's folder, flushes and fsyncs it, then renames it over the destination,
so a reader (or a run resumed after a kill) sees the old file or the new one, never half of one.

Folders (shards, synthetic twins): everything is written into a hidden staging folder beside the
destination; only when writing succeeded is the staging folder renamed into place (one ``rename`` on the
same file system). An interrupted run leaves only the staging folder, which the next run removes.

It lives in ``data`` because that is the lowest package that writes files; ``pipelines`` uses it for
everything it writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

STAGING_SUFFIX = ".partial"
OLD_SUFFIX = ".old"
# written into every folder the project writes whole: only such a folder may be replaced without --force
OWNER_MARKER = ".vitadapter-output.json"


class ForeignFolderError(ValueError):
    """A destination folder holds files the project did not write; the message says what to do."""


def check_replaceable(destination: str | os.PathLike[str], *, force: bool = False) -> None:
    """Refuse to replace a non-empty folder that lacks :data:`OWNER_MARKER` (someone else's data) unless ``force``.

    Raises:
        ForeignFolderError: naming the folder, what was found and the way out.
    """
    destination = Path(destination)
    if destination.is_file():
        raise ForeignFolderError(f"{destination} is a file, not a folder: choose another output folder")
    listing = None if force else _foreign_listing(destination)
    if listing:
        raise ForeignFolderError(
            f"{destination} is not empty ({listing}) and was not written by vitadapter (no {OWNER_MARKER}): "
            "refusing to replace it; choose an empty or new folder, or pass --force to replace it anyway"
        )


def _foreign_listing(destination: Path) -> str | None:
    """``N entries: a, b, c, ...`` of a non-empty folder without :data:`OWNER_MARKER`; None otherwise."""
    if not destination.is_dir() or (destination / OWNER_MARKER).is_file():
        return None
    entries = sorted(p.name for p in destination.iterdir())
    if not entries:
        return None
    return f"{len(entries)} entries: " + ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")


def check_claimable(destination: str | os.PathLike[str]) -> None:
    """Refuse to write files into ``destination`` unless it is new, empty, or marked with :data:`OWNER_MARKER`.

    Read-only (every rank of a distributed run may check before one of them claims it, :func:`claim_folder`).

    Raises:
        ForeignFolderError: naming the folder, what was found and the way out.
    """
    destination = Path(destination)
    if destination.exists() and not destination.is_dir():
        raise ForeignFolderError(f"{destination} is a file, not a folder: choose another output folder")
    listing = _foreign_listing(destination)
    if listing:
        raise ForeignFolderError(
            f"{destination} is not empty ({listing}) and was not written by vitadapter (no {OWNER_MARKER}): "
            "refusing to write into it; choose an empty or new folder"
        )


def claim_folder(destination: str | os.PathLike[str], *, writer: str = "vitadapter") -> Path:
    """Create ``destination`` (or keep one the project wrote) to write files into one by one, each atomically.

    Unlike :func:`atomic_directory` the folder is not replaced: files are added to it and files of the same
    name overwritten. It gets :data:`OWNER_MARKER` (naming ``writer``), so a later run may write into it again.

    Raises:
        ForeignFolderError: ``destination`` is a file, or a non-empty folder without the marker
            (:func:`check_claimable`).
    """
    destination = Path(destination)
    check_claimable(destination)
    destination.mkdir(parents=True, exist_ok=True)
    marker = destination / OWNER_MARKER
    if not marker.is_file():
        write_json_atomic(marker, {"written_by": writer})
    return destination


def check_disjoint(source: str | os.PathLike[str], destination: str | os.PathLike[str]) -> None:
    """Refuse an output folder equal to, inside, or containing the input folder.

    Raises:
        ForeignFolderError: naming both folders.
    """
    src, dst = Path(source).resolve(), Path(destination).resolve()
    if src == dst or src in dst.parents or dst in src.parents:
        relation = "is" if src == dst else ("is inside" if src in dst.parents else "contains")
        raise ForeignFolderError(
            f"the output folder {destination} {relation} the input folder {source}: replacing it would destroy "
            "the input; choose an output folder outside it"
        )


TMP_SUFFIX = ".tmp"
HASH_CHUNK = 1 << 20


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(handle)`` on a temporary file beside ``path``, fsync it, rename it to ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda handle: handle.write(text.encode()))


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (e.g. an image encoded with ``cv2.imencode``)."""
    return atomic_write(path, lambda handle: handle.write(data))


def write_json_atomic(path: str | os.PathLike[str], payload: Any) -> Path:
    """Write ``payload`` as indented JSON to ``path`` atomically."""
    return write_text_atomic(path, json.dumps(payload, indent=1, default=str) + "\n")


def staging_path(destination: Path) -> Path:
    """The staging folder used for ``destination``."""
    return destination.parent / f".{destination.name}{STAGING_SUFFIX}"


@contextlib.contextmanager
def atomic_directory(
    destination: str | Path, *, writer: str = "vitadapter", force: bool = False
) -> Iterator[Path]:
    """Yield an empty staging folder; on success it replaces ``destination`` atomically.

    The staging folder gets :data:`OWNER_MARKER` (naming ``writer``), so a later run may replace it; a
    non-empty ``destination`` without the marker is refused unless ``force`` (:func:`check_replaceable`).
    On an exception the staging folder is removed and ``destination`` is left as it was.
    """
    destination = Path(destination)
    check_replaceable(destination, force=force)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(destination)
    if staging.exists():
        log.info("removing %s left by an interrupted run", staging)
        shutil.rmtree(staging)
    staging.mkdir()
    (staging / OWNER_MARKER).write_text(json.dumps({"written_by": writer}) + "\n")
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = destination.parent / f".{destination.name}{OLD_SUFFIX}"
    if old.exists():
        shutil.rmtree(old)
    if destination.exists():
        os.replace(destination, old)
    os.replace(staging, destination)
    if old.exists():
        shutil.rmtree(old)
