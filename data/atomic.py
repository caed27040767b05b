"""Atomic replacement of an output folder.

Everything is written into a hidden staging folder beside the destination; only when writing succeeded is
the staging folder renamed into place (one ``rename`` on the same file system), so a reader never sees a
half-written destination. An interrupted run leaves only the staging folder, which the next run removes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

STAGING_SUFFIX = ".partial"
OLD_SUFFIX = ".old"


def staging_path(destination: Path) -> Path:
    """The staging folder used for ``destination``."""
    return destination.parent / f".{destination.name}{STAGING_SUFFIX}"


@contextlib.contextmanager
def atomic_directory(destination: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder; on success it replaces ``destination`` atomically.

    On an exception the staging folder is removed and ``destination`` is left as it was.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(destination)
    if staging.exists():
        log.info("removing %s left by an interrupted run", staging)
        shutil.rmtree(staging)
    staging.mkdir()
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
