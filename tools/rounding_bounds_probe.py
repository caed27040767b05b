"""Which train-step spreads another seed fails to reproduce, one seed at a time (tests/test_rounding_bounds.py).

The slow test compares the stored 8-run spreads with two fresh seeds together and stops at the first key
off by more than its factor (2); this prints every such key with the ratio for each seed alone, so that one
outlier draw (a discontinuity the branch pins miss) shows apart from a spread that is wrong everywhere.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python tools/rounding_bounds_probe.py [SEED ...]`` (about 2 min a seed).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "tests" / "engine")]

from test_rounding_bounds import FACTOR  # noqa: E402  (the slow test's factor)

import recorded_step  # noqa: E402
from reference_data import FIXTURES  # noqa: E402


def main() -> None:
    seeds = [int(arg) for arg in sys.argv[1:]] or [1000, 1001]
    stored = json.loads((FIXTURES / f"train_step_{recorded_step.FIXTURE}.rounding.json").read_text())
    fresh = {seed: recorded_step.spreads(recorded_step.golden(), iter([seed])) for seed in seeds}
    for group in ("quantities", "gradient_norms"):
        for key, old in stored[group].items():
            if not old["norm"]:
                continue
            ratios = [fresh[seed][group][key]["norm"] / old["norm"] for seed in seeds]
            if any(not 1 / FACTOR <= ratio <= FACTOR for ratio in ratios):
                peaks = " ".join(f"{fresh[seed][group][key]['peak']:.3g}" for seed in seeds)
                print(
                    group,
                    key,
                    old["elements"],
                    [f"{r:.2f}" for r in ratios],
                    f"peak old {old['peak']:.3g} new {peaks}",
                )


if __name__ == "__main__":
    main()
