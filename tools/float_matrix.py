"""Run the float-comparing tests under other float32 implementations of this machine, and the planted bugs.

A test whose tolerance follows from float32 rounding (tests/rounding.py) must pass on any correct IEEE
float32 implementation. Another CPU is out of reach, so this runs the tests under the paths this machine
can take instead, each in a fresh process:

* ``OMP_NUM_THREADS`` 1, 2 and 4: other reduction splits (summation orders) in torch's CPU kernels;
* ``torch.backends.mkldnn.enabled = False``: convolutions and matrix products leave oneDNN for torch's own
  kernels;
* ``ONEDNN_MAX_CPU_ISA=SSE41``: oneDNN's kernels of another vector width (what a CPU without AVX2 runs);
* ``ATEN_CPU_CAPABILITY=default``: torch's elementwise and reduction kernels without AVX2 vectorisation.

Then, with the planted bugs of tests/engine/test_train_step_planted_bugs.py (``slow``), it checks the other
half: each bug fails the train-step checks. Results go to ``benchmarks/float_matrix/results.json`` (with the
machine), a table to the log.

Run: ``.venv/bin/python tools/float_matrix.py [--tests FILE ...] [--only NAME ...]`` (minutes).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "float_matrix" / "results.json"
DEFAULT_TESTS = [
    "tests/test_rounding.py",
    "tests/engine/test_train_step_reference.py",
    "tests/models/test_parity.py",
    "tests/models/test_mask2former_parity.py",
    "tests/pipelines/test_export.py",
    "tests/models/test_trunk_extensions.py::test_timm_state_dict_loads_and_gives_timm_patch_tokens",
    "tests/models/test_trunk_extensions.py::test_authors_layouts_are_converted_by_timms_filter",
    "tests/models/test_segmentor.py::test_gradient_checkpointing_gives_the_same_gradients",
    "tests/models/test_mask2former.py::test_gradient_checkpointing_gives_the_same_gradients",
    "tests/models/test_mask2former.py::test_batched_forward_equals_one_image_at_a_time",
    "tests/models/test_mask2former.py::test_batch_matching_equals_image_by_image_matching",
]
PLANTED = "tests/engine/test_train_step_planted_bugs.py"
# name -> (environment, python statements run before pytest)
CONFIGURATIONS: dict[str, tuple[dict[str, str], str]] = {
    "threads=1": ({"OMP_NUM_THREADS": "1"}, ""),
    "threads=2": ({"OMP_NUM_THREADS": "2"}, ""),
    "threads=4": ({"OMP_NUM_THREADS": "4"}, ""),
    "threads=2 mkldnn off": ({"OMP_NUM_THREADS": "2"}, "torch.backends.mkldnn.enabled = False"),
    "threads=2 ONEDNN_MAX_CPU_ISA=SSE41": ({"OMP_NUM_THREADS": "2", "ONEDNN_MAX_CPU_ISA": "SSE41"}, ""),
    "threads=2 ATEN_CPU_CAPABILITY=default": ({"OMP_NUM_THREADS": "2", "ATEN_CPU_CAPABILITY": "default"}, ""),
}

log = logging.getLogger("float_matrix")


def run_pytest(args: list[str], env: dict[str, str], setup: str) -> tuple[int, str, float]:
    """pytest in a fresh interpreter with ``env`` and ``setup`` applied first; (exit status, summary, seconds)."""
    code = f"import sys, torch, pytest\n{setup}\nsys.exit(pytest.main({args!r}))"
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    summary = lines[-1].strip("= ") if lines else done.stderr.strip()[-300:]
    failed = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    return done.returncode, "; ".join([summary, *failed]), time.monotonic() - start


def planted_failures() -> dict[str, list[str]]:
    """Which train-step checks each planted model bug fails (the test only demands a subset)."""
    code = (
        "import sys, json\nsys.path[:0] = ['tests', 'tests/engine']\n"
        "import test_train_step_planted_bugs as t\n"
        "print(json.dumps({bug: t._failures(bug) for bug in t.MODEL_BUGS}))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _commit() -> str:
    """The checked-out commit, with ``+changes`` when the tree differs from it."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True
    )
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def machine() -> dict[str, str]:
    import torch

    model = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model,
        "cores": str(os.cpu_count()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tests", nargs="+", default=DEFAULT_TESTS, help="test files run in each configuration"
    )
    parser.add_argument(
        "--only", action="append", choices=[*CONFIGURATIONS, "planted"], help="configurations"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    results["machine"] = machine()
    runs = results.setdefault("configurations", {})
    runs.pop("planted: the checks each bug fails", None)  # an earlier layout of this file
    for name in args.only or [*CONFIGURATIONS, "planted"]:
        if name == "planted":
            # every planted bug must fail: the test file's parametrised cases pass when their bug is caught
            status, summary, seconds = run_pytest(
                ["-q", "-m", "slow", "-p", "no:cacheprovider", PLANTED], {}, ""
            )
            tests = [PLANTED]
            results["planted_bugs_fail"] = planted_failures()
            log.info("the checks each planted bug fails: %s", results["planted_bugs_fail"])
        else:
            env, setup = CONFIGURATIONS[name]
            status, summary, seconds = run_pytest(["-q", "-p", "no:cacheprovider", *args.tests], env, setup)
            tests = args.tests
        runs[name] = {
            "exit_status": status,
            "summary": summary,
            "seconds": round(seconds),
            "tests": tests,
            # the entries of one file may come from several invocations: each says which tree it ran on
            "commit": _commit(),
            "date": datetime.date.today().isoformat(),
        }
        log.info("%-40s exit %d  %s  (%.0f s)", name, status, summary, seconds)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    tmp.replace(RESULTS)
    log.info("wrote %s", RESULTS)
    # entries written by hand (a whole `make test`, say) carry no exit status: only this tool's runs count
    if any(run.get("exit_status", 0) != 0 for run in runs.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
