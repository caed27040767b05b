"""Atomic writes of files and folders: the one module every writer of the project uses.

Files (checkpoints, metrics JSON, reports, logs, downloads, shard indexes): :func:`atomic_write` writes a
temporary file in the destination's folder, flushes and fsyncs it, then renames it over the destination,
so a reader (or a run resumed after a kill) sees the old file or the new one, never half of one.

Folders (shards, synthetic twins): everything is written into a hidden staging folder beside the
destination; only when writing succeeded is the staging folder renamed into place (one ``rename`` on the
same file system). An interrupted run leaves only the staging folder, which the next run removes.

Logs (``train_log.jsonl`` and the other JSON-lines files): :func:`append_line` appends one whole line or, when
the write fails, cuts the file back to where it was, so no torn line is left behind.

A write that fails (a full disk, a quota, an I/O error) is a :class:`WriteError`: one line naming the path,
the bytes it needed and the free space there (``os.statvfs``), raised after the temporary file or staging
folder was removed, the previous file left as it was. ``torch.save`` reports a full disk as a ``RuntimeError``
(``unexpected pos``) rather than the ``OSError`` it met: the handle given to the writer records that
``OSError``, and a failure with no free space left is a full disk whatever its exception says.

It lives in ``data`` because that is the lowest package that writes files; ``pipelines`` uses it for
everything it writes.
"""

from __future__ import annotations

import contextlib
import errno
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


# a failure with less free space than this left is the disk being full, whatever the exception says
NEARLY_FULL_BYTES = 64 * 1024


class WriteError(OSError, RuntimeError):
    """Writing a file or folder failed (a full disk, a quota, an I/O error); nothing was replaced.

    An ``OSError`` (``errno`` is the one met, ``filename`` the path) and a ``RuntimeError`` (the command line
    reports it as a one-line error).

    Attributes:
        path: the file or folder that could not be written.
        needed: the bytes the write needed (an estimate where the writer gave one, else what it had written
            when it failed; None when unknown).
        free: the bytes free on that file system after the partial output was removed (None: unknown).
    """

    def __init__(self, message: str, *, path: Path, code: int | None, needed: int | None, free: int | None):
        super().__init__(code, message, str(path))
        self.message = message
        self.path = path
        self.needed = needed
        self.free = free

    def __str__(self) -> str:
        return self.message

    def naming(self, path: str | os.PathLike[str]) -> WriteError:
        """The same error naming ``path`` (the final name of a file first written under another)."""
        message = self.message.replace(str(self.path), str(path), 1)
        return WriteError(message, path=Path(path), code=self.errno, needed=self.needed, free=self.free)

    def __reduce__(self) -> tuple[Any, ...]:  # picklable with its keyword arguments (worker processes)
        return (_rebuild_write_error, (self.message, self.path, self.errno, self.needed, self.free))


def _rebuild_write_error(message: str, path: Path, code: int | None, needed: int | None, free: int | None):
    return WriteError(message, path=path, code=code, needed=needed, free=free)


def describe_bytes(count: int) -> str:
    """``8194612 bytes (7.8 MiB)``."""
    if count < 1024:
        return f"{count} bytes"
    value, units = count / 1024, ["KiB", "MiB", "GiB", "TiB"]
    while value >= 1024 and len(units) > 1:
        value, units = value / 1024, units[1:]
    return f"{count} bytes ({value:.1f} {units[0]})"


def free_bytes(path: str | os.PathLike[str]) -> int | None:
    """Bytes free to an unprivileged writer on the file system of ``path`` (its nearest existing folder)."""
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        stat = os.statvfs(folder)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


def write_error(
    path: str | os.PathLike[str],
    err: BaseException,
    *,
    needed: int | None,
    at_least: bool = False,
    what: str = "write",
) -> WriteError:
    """The one-line :class:`WriteError` of a failed write of ``path``: the reason, the bytes needed (``at_least``:
    only what was written before it failed is known), the space free there (measured now: call it after
    removing the partial output)."""
    path = Path(path)
    code = err.errno if isinstance(err, OSError) and err.errno else errno.ENOSPC
    reason = os.strerror(code)
    free = free_bytes(path.parent)
    space = [
        f"needs {'at least' if at_least else 'about'} {describe_bytes(needed)}" if needed else "size unknown"
    ]
    space.append(f"{describe_bytes(free)} free there" if free is not None else "free space unknown")
    kept = (
        "the file is as it was (no partial line)"
        if what == "append to"
        else "nothing was replaced and no partial file left"
    )
    message = (
        f"cannot {what} {path}: {reason} ({', '.join(space)}); {kept}: free space (or choose another "
        "folder) and run it again"
    )
    return WriteError(message, path=path, code=code, needed=needed, free=free)


# errors only writing produces: met anywhere in a failure's chain, they are the output's
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


def _io_failure(
    err: BaseException, recorded: OSError | None, folder: Path, *, guess_from_space: bool
) -> BaseException | None:
    """The write error behind ``err``, or None for a failure that is not the output's.

    It is the ``OSError`` the handle recorded; else an ``OSError`` in ``err``'s chain that only writes give
    (:data:`WRITE_ERRNOS`) or that names a file inside ``folder``; else, with ``guess_from_space``, ``err``
    itself when it is a ``RuntimeError`` and ``folder``'s file system is (nearly) full.
    """
    if recorded is not None:
        return recorded
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, OSError) and not isinstance(cause, WriteError):
            inside = isinstance(cause.filename, str) and cause.filename.startswith(str(folder))
            if cause.errno in WRITE_ERRNOS or (inside and cause.errno is not None):
                return cause
        cause = cause.__cause__ or cause.__context__
    if guess_from_space and isinstance(err, RuntimeError) and not isinstance(err, WriteError):
        free = free_bytes(folder)
        if free is not None and free < NEARLY_FULL_BYTES:
            return err
    return None


class _RecordingFile:
    """The handle a writer gets: the real file's ``write`` and ``flush``, counting bytes and keeping the first
    ``OSError`` (a caller such as ``torch.save`` may turn it into an exception that no longer says it)."""

    def __init__(self, handle: IO[bytes]) -> None:
        self._handle = handle
        self.written = 0
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            count = self._handle.write(data)
        except OSError as err:
            self.error = self.error or err
            self.written += memoryview(data).nbytes  # what it tried: the size is at least this
            raise
        self.written += count if count is not None else len(data)
        return count

    def flush(self) -> None:
        self.call(self._handle.flush)

    def call(self, operation: Callable[..., Any], *args: Any) -> Any:
        """``operation(*args)``, keeping its ``OSError`` (flush, fsync and rename of the output)."""
        try:
            return operation(*args)
        except OSError as err:
            self.error = self.error or err
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


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


def atomic_write(
    path: str | os.PathLike[str], write: Callable[[IO[bytes]], None], *, size_hint: int | None = None
) -> Path:
    """Call ``write(handle)`` on a temporary file beside ``path``, fsync it, rename it to ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was.

    Args:
        path: the destination.
        write: writes the content into the handle it is given.
        size_hint: the bytes the content takes, if known (named when the write fails).

    Raises:
        WriteError: the write failed for lack of space or another I/O error (naming ``path``, the bytes
            needed and the free space), after the temporary file was removed.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    except OSError as err:
        raise write_error(path, err, needed=size_hint) from err
    recorder: _RecordingFile | None = None
    try:
        with os.fdopen(fd, "wb") as handle:
            recorder = _RecordingFile(handle)
            write(recorder)  # type: ignore[arg-type]  # a file-like object with write and flush
            recorder.flush()
            recorder.call(os.fsync, handle.fileno())
        recorder.call(os.replace, tmp, path)
    except BaseException as err:
        recorded = recorder.error if recorder is not None else None
        failure = _io_failure(err, recorded, path.parent, guess_from_space=True)
        written = recorder.written if recorder is not None else 0
        Path(tmp).unlink(missing_ok=True)
        if failure is None:
            raise
        needed = size_hint if size_hint and size_hint > written else written
        raise write_error(path, failure, needed=needed or None, at_least=needed != size_hint) from err
    return path


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    data = text.encode()
    return atomic_write(path, lambda handle: handle.write(data), size_hint=len(data))


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (e.g. an image encoded with ``cv2.imencode``)."""
    return atomic_write(path, lambda handle: handle.write(data), size_hint=len(data))


def append_line(path: str | os.PathLike[str], line: str) -> Path:
    """Append ``line`` (a newline is added) to ``path`` whole, and fsync it; on a failed write the file is cut
    back to its previous length, so no torn line is left.

    Raises:
        WriteError: the append failed (naming ``path``, the bytes needed and the free space).
    """
    path = Path(path)
    data = (line.rstrip("\n") + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as err:
        raise write_error(path, err, needed=len(data), what="append to") from err
    try:
        before = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except OSError as err:
            os.ftruncate(fd, before)
            raise write_error(path, err, needed=len(data), what="append to") from err
    finally:
        os.close(fd)
    return path


def write_json_atomic(path: str | os.PathLike[str], payload: Any) -> Path:
    """Write ``payload`` as indented JSON to ``path`` atomically."""
    return write_text_atomic(path, json.dumps(payload, indent=1, default=str) + "\n")


def staging_path(destination: Path) -> Path:
    """The staging folder used for ``destination``."""
    return destination.parent / f".{destination.name}{STAGING_SUFFIX}"


def folder_bytes(folder: Path) -> int:
    """The bytes of the files under ``folder`` (0 when it is gone)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


@contextlib.contextmanager
def atomic_directory(
    destination: str | Path, *, writer: str = "vitadapter", force: bool = False, size_hint: int | None = None
) -> Iterator[Path]:
    """Yield an empty staging folder; on success it replaces ``destination`` atomically.

    The staging folder gets :data:`OWNER_MARKER` (naming ``writer``), so a later run may replace it; a
    non-empty ``destination`` without the marker is refused unless ``force`` (:func:`check_replaceable`).
    On an exception the staging folder is removed and ``destination`` is left as it was.

    Args:
        destination: the folder to write.
        writer: named in the owner marker.
        force: replace a folder vitadapter did not write.
        size_hint: the bytes the folder will take, if known (named when writing fails).

    Raises:
        WriteError: writing into the staging folder failed for lack of space or another I/O error (naming
            the file being written where known, else ``destination``, the bytes needed and the free space).
    """
    destination = Path(destination)
    check_replaceable(destination, force=force)
    staging = staging_path(destination)
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        if staging.exists():
            log.info("removing %s left by an interrupted run", staging)
            shutil.rmtree(staging)
        staging.mkdir()
        (staging / OWNER_MARKER).write_text(json.dumps({"written_by": writer}) + "\n")
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise write_error(destination, err, needed=size_hint) from err
    try:
        yield staging
    except BaseException as err:
        failure = _io_failure(err, None, staging, guess_from_space=False)
        written = folder_bytes(staging) if failure is not None else 0
        shutil.rmtree(staging, ignore_errors=True)
        if failure is None or isinstance(err, WriteError):
            raise
        # the file being written when it failed, under its final name (the staging folder is gone)
        filename = getattr(failure, "filename", None)
        inside = Path(filename) if isinstance(filename, str) and filename.startswith(str(staging)) else None
        target = destination / inside.relative_to(staging) if inside is not None else destination
        needed = size_hint if size_hint and size_hint > written else written
        raise write_error(target, failure, needed=needed or None, at_least=needed != size_hint) from err
    old = destination.parent / f".{destination.name}{OLD_SUFFIX}"
    if old.exists():
        shutil.rmtree(old)
    if destination.exists():
        os.replace(destination, old)
    os.replace(staging, destination)
    if old.exists():
        shutil.rmtree(old)
