"""Fail the image build when the installed set is not the locked one (run by the Dockerfile).

``pip install -c requirements.lock`` pins every package it installs that the lock names, but would let a
package the lock does not name in unpinned; this check closes that gap: every distribution installed in
the interpreter running it must be pinned by the lock at its installed version. A local version label
(``2.13.0+cpu``, a CPU build of torch taken from the build's extra wheels) matches the lock's public
version, as ``==`` does in pip.

Usage: ``python check_lock.py requirements.lock`` (exit status 1 and one line per mismatch otherwise).
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

# the project itself (installed from its own wheel) and the installer seeded by `python -m venv`
NOT_LOCKED = {"vitadapter", "pip"}


def canonical(name: str) -> str:
    """A distribution name in its PEP 503 normal form."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    """``{name: version}`` of a lock file's ``name==version`` lines (comments and markers ignored)."""
    pins: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;]+)\s*(;.*)?", line)
        if match is None:
            raise ValueError(f"{path}:{number}: not a 'name==version' pin: {line!r}")
        pins[canonical(match.group(1))] = match.group(3)
    return pins


def mismatches(pins: dict[str, str]) -> list[str]:
    """One line per installed distribution that the lock does not pin at its version."""
    problems = []
    for dist in metadata.distributions():
        name = canonical(dist.metadata["Name"])
        if name in NOT_LOCKED:
            continue
        public = dist.version.split("+", 1)[0]
        if name not in pins:
            problems.append(f"{name}=={dist.version} is installed but not in the lock")
        elif pins[name] != public:
            problems.append(f"{name}=={dist.version} is installed; the lock pins {pins[name]}")
    return sorted(problems)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        sys.stderr.write("usage: check_lock.py REQUIREMENTS_LOCK\n")
        return 2
    path = Path(argv[0])
    problems = mismatches(read_lock(path))
    for problem in problems:
        sys.stderr.write(f"{path}: {problem}\n")
    if problems:
        return 1
    sys.stdout.write(f"{path}: every installed distribution is pinned at its locked version\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
