"""The repository stands on its own: no path into a reference folder outside it, in code, docs or Makefile."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NEEDLE = "shared" + "/"  # spelled apart so that this file does not match itself


def test_no_file_cites_a_folder_outside_the_repository() -> None:
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "*.py", "*.md", "Makefile"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    offenders = [
        f"{name}:{number}"
        for name in listed
        if (REPO / name).is_file()
        for number, line in enumerate((REPO / name).read_text(errors="replace").splitlines(), 1)
        if NEEDLE in line
    ]
    assert offenders == [], offenders
