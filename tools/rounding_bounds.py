"""Write the float32 rounding spreads the numerical tests take their tolerances from.

For the recorded training step (``tests/recorded_step.py``) and the parity goldens, runs the computation in
float64 under float32's emulated rounding (``tests/rounding.py``: every operation's result carries a random
error of the size float32 rounding gives it) a few times, with the branch choices pinned to exact
arithmetic's, and stores the spread of every compared quantity in
``tests/fixtures/reference/<fixture>.rounding.json``. The spreads depend on the computation and its inputs
only (the runs are float64 and seeded), so they hold on every machine; ``tests/test_rounding_bounds.py``
(``slow``) recomputes them with other seeds and checks that they agree.

Run: ``.venv/bin/python tools/rounding_bounds.py [--only train_step|upernet_tiny|beit_backbone|mask2former]``
(minutes: each emulated run is a float64 forward, and backward for the training step, with every operation
intercepted).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(TESTS.parent))

import parity_runs  # noqa: E402
import recorded_step  # noqa: E402
from reference_data import FIXTURES  # noqa: E402
from rounding import LAMBDA, RUNS, U32  # noqa: E402

log = logging.getLogger("rounding_bounds")


def _header(what: str, seeds: list[int]) -> dict:
    return {
        "what": what,
        "model": "float32 rounding emulated in float64 (tests/rounding.py), branch choices pinned to exact's",
        "unit_roundoff": U32,
        "lambda": LAMBDA,
        "seeds": seeds,
        "torch": torch.__version__,
    }


def _write(path: Path, data: dict) -> None:
    text = json.dumps(data, indent=1, sort_keys=True) + "\n"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    log.info("wrote %s", path)


def train_step(seeds: list[int]) -> None:
    recorded = recorded_step.golden()
    data = recorded_step.spreads(recorded, iter(seeds))
    _write(
        FIXTURES / f"train_step_{recorded_step.FIXTURE}.rounding.json",
        {**_header("the recorded training step (tests/recorded_step.py)", seeds), **data},
    )


def parity(name: str, seeds: list[int]) -> None:
    data = parity_runs.spreads(name, iter(seeds))
    _write(FIXTURES / f"golden_{name}.rounding.json", {**_header(f"the parity golden {name}", seeds), **data})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["train_step", *parity_runs.GOLDENS], action="append")
    parser.add_argument(
        "--runs",
        type=int,
        help=f"emulated runs per spread (default: {RUNS} for the training step, whose scalars need them; "
        f"{parity_runs.PARITY_RUNS} for the goldens, compared by norms, which concentrate)",
    )
    parser.add_argument("--first-seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for what in args.only or ["train_step", *parity_runs.GOLDENS]:
        runs = args.runs or (RUNS if what == "train_step" else parity_runs.PARITY_RUNS)
        seeds = list(range(args.first_seed, args.first_seed + runs))
        start = time.monotonic()
        if what == "train_step":
            train_step(seeds)
        else:
            parity(what, seeds)
        log.info("%s: %d runs in %.0f s", what, len(seeds), time.monotonic() - start)


if __name__ == "__main__":
    main()
