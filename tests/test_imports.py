"""No import cycles: the modules of each room of pipelines (engine, reporting, runs, ...) and of models, data and
cuda_ops import each other one way only (the ``no-cycles`` contract of pyproject.toml, checked by import-linter
from the real import graph, imports inside functions and under TYPE_CHECKING included)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_no_module_cycle_inside_a_room() -> None:
    run = subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports"), "--contract", "no-cycles", "--no-cache"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    # the two cycles there were: the evaluator and the label map, the records and the tracker
    assert "Contracts: 1 kept, 0 broken." in run.stdout
