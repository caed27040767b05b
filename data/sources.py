"""Uniform read access to the official distributions, extracted or still in their archives.

A :class:`SourceSpec` names a folder, a zip or a tar archive (any compression) plus a prefix inside it; it is a
small picklable value, so worker processes re-open the same source with :func:`open_source`. Zip and plain tar
archives are read in place (random access); a compressed tar is read once, sequentially, and the members a
reader asks for are kept in memory (only small archives such as PASCAL-Context's ``trainval.tar.gz`` are
distributed that way).
"""

from __future__ import annotations

import functools
import logging
import os
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

log = logging.getLogger(__name__)

SourceKind = Literal["dir", "zip", "tar"]
ARCHIVE_SUFFIXES: dict[str, SourceKind] = {
    ".zip": "zip",
    ".tar": "tar",
    ".tar.gz": "tar",
    ".tgz": "tar",
    ".tar.bz2": "tar",
    ".tar.xz": "tar",
}
_OPEN_SOURCES_CACHE = 8


@dataclass(frozen=True)
class SourceSpec:
    """Where raw files live.

    Attributes:
        kind: ``dir`` (an extracted folder), ``zip`` or ``tar``.
        path: the folder or archive on disk.
        prefix: folder inside the source that member names are relative to (``""`` for the top).
    """

    kind: SourceKind
    path: str
    prefix: str = ""

    def describe(self, name: str) -> str:
        """Human-readable location of member ``name`` for messages."""
        inner = f"{self.prefix}/{name}" if self.prefix else name
        if self.kind == "dir":
            return str(Path(self.path) / inner)
        return f"{self.path}:{inner}"

    def child(self, folder: str) -> SourceSpec:
        """The same source, rooted one folder deeper."""
        prefix = f"{self.prefix}/{folder}" if self.prefix else folder
        return SourceSpec(self.kind, self.path, prefix.strip("/"))


class Source(Protocol):
    """Read-only view of a :class:`SourceSpec`; member names are relative to its prefix."""

    spec: SourceSpec

    def list(self, folder: str = "") -> list[str]:
        """Sorted names of the regular files below ``folder`` (recursively), relative to the prefix."""
        ...

    def exists(self, name: str) -> bool:
        """Whether regular file ``name`` exists."""
        ...

    def is_dir(self, name: str) -> bool:
        """Whether folder ``name`` exists (holds at least one file for archives)."""
        ...

    def size(self, name: str) -> int:
        """Size in bytes of file ``name``."""
        ...

    def read(self, name: str) -> bytes:
        """The bytes of file ``name``; ``FileNotFoundError`` naming it when missing."""
        ...


def archive_kind(path: Path) -> SourceKind | None:
    """``zip`` or ``tar`` when ``path``'s name ends like an archive, else ``None``."""
    name = path.name.lower()
    for suffix, kind in ARCHIVE_SUFFIXES.items():
        if name.endswith(suffix):
            return kind
    return None


class _DirSource:
    def __init__(self, spec: SourceSpec) -> None:
        self.spec = spec
        self._root = Path(spec.path) / spec.prefix

    def list(self, folder: str = "") -> list[str]:
        base = self._root / folder
        if not base.is_dir():
            return []
        names = []
        for dirpath, _, filenames in os.walk(base):
            rel = Path(dirpath).relative_to(self._root)
            names.extend((rel / f).as_posix() for f in filenames)
        return sorted(names)

    def exists(self, name: str) -> bool:
        return (self._root / name).is_file()

    def is_dir(self, name: str) -> bool:
        return (self._root / name).is_dir()

    def size(self, name: str) -> int:
        return (self._root / name).stat().st_size

    def read(self, name: str) -> bytes:
        path = self._root / name
        if not path.is_file():
            raise FileNotFoundError(f"missing file {path}")
        return path.read_bytes()


class _ArchiveIndex:
    """An opened archive: member sizes by full name, and a reader of full names."""

    sizes: dict[str, int]

    def read_full(self, name: str) -> bytes:
        raise NotImplementedError


class _ZipIndex(_ArchiveIndex):
    def __init__(self, path: str) -> None:
        self._zip = zipfile.ZipFile(path)
        self.sizes = {i.filename: i.file_size for i in self._zip.infolist() if not i.is_dir()}

    def read_full(self, name: str) -> bytes:
        return self._zip.read(name)


class _TarIndex(_ArchiveIndex):
    def __init__(self, path: str) -> None:
        self._cache: dict[str, bytes] | None = None
        self._tar: tarfile.TarFile | None = None
        try:
            # Plain tar: random access through the member table.
            self._tar = tarfile.open(path, mode="r:")  # noqa: SIM115 (kept open: members are read on demand)
            self._members = {m.name.removeprefix("./"): m for m in self._tar.getmembers() if m.isfile()}
            self.sizes = {name: member.size for name, member in self._members.items()}
        except tarfile.ReadError:
            log.info("reading compressed archive %s once into memory", path)
            self._cache = {}
            with tarfile.open(path, mode="r:*") as tar:
                for member in tar:
                    handle = tar.extractfile(member) if member.isfile() else None
                    if handle is not None:
                        self._cache[member.name.removeprefix("./")] = handle.read()
            self.sizes = {name: len(data) for name, data in self._cache.items()}

    def read_full(self, name: str) -> bytes:
        if self._cache is not None:
            return self._cache[name]
        assert self._tar is not None  # set whenever there is no cache
        handle = self._tar.extractfile(self._members[name])
        if handle is None:
            raise FileNotFoundError(f"{name} is not a regular file")
        return handle.read()


class _ArchiveSource:
    """A prefix view of an opened archive."""

    def __init__(self, spec: SourceSpec, index: _ArchiveIndex) -> None:
        self.spec = spec
        self._index = index

    def _full(self, name: str) -> str:
        return f"{self.spec.prefix}/{name}" if self.spec.prefix else name

    def list(self, folder: str = "") -> list[str]:
        prefix = f"{self.spec.prefix}/" if self.spec.prefix else ""
        names = sorted(n[len(prefix) :] for n in self._index.sizes if n.startswith(prefix))
        if not folder:
            return names
        start = folder.rstrip("/") + "/"
        return [n for n in names if n.startswith(start)]

    def exists(self, name: str) -> bool:
        return self._full(name) in self._index.sizes

    def is_dir(self, name: str) -> bool:
        start = self._full(name).rstrip("/") + "/"
        return any(n.startswith(start) for n in self._index.sizes)

    def size(self, name: str) -> int:
        if not self.exists(name):
            raise FileNotFoundError(f"missing file {self.spec.describe(name)}")
        return self._index.sizes[self._full(name)]

    def read(self, name: str) -> bytes:
        if not self.exists(name):
            raise FileNotFoundError(f"missing file {self.spec.describe(name)}")
        return self._index.read_full(self._full(name))


@functools.lru_cache(maxsize=_OPEN_SOURCES_CACHE)
def _open_archive(kind: SourceKind, path: str, pid: int) -> _ArchiveIndex:
    # ``pid`` is part of the key: a forked worker must not share its parent's file offsets.
    del pid
    return _ZipIndex(path) if kind == "zip" else _TarIndex(path)


def open_source(spec: SourceSpec) -> Source:
    """Open ``spec``; an archive is opened once per process and shared by every prefix view of it."""
    if spec.kind == "dir":
        return _DirSource(spec)
    return _ArchiveSource(spec, _open_archive(spec.kind, spec.path, os.getpid()))
