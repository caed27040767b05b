"""The GPU suite's ``--dry-run`` runs every step end to end on the CPU and writes a complete result file.

``benchmarks/gpu_suite.py`` is run once on a lent GPU machine whose stack has no mlflow, prefect, dvc
or webdataset; the dry run here imports them as missing packages, so an import that would fail there
fails here. Its figures (toy models, the Triton interpreter) mean nothing; the keys must all be there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = "benchmarks/gpu_suite.py"
ABSENT_ON_GPU_MACHINE = ("mlflow", "prefect", "dvc", "webdataset", "wids")
META_FIELDS = {"mode", "date", "command", "device", "torch", "triton", "cuda", "git_commit", "python"}
OUTPUTS = {"output", "grad_value", "grad_sampling_locations", "grad_attention_weights"}


def _run_suite(tmp_path: Path, *args: str) -> tuple[dict[str, Any], str]:
    """``PYTHONPATH=. python benchmarks/gpu_suite.py --dry-run --out DIR`` with the GPU machine's gaps."""
    blocked = tmp_path / "absent"
    for name in ABSENT_ON_GPU_MACHINE:
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(
            f"raise ImportError('{name} is not on the GPU machine')\n"
        )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(blocked), "."])
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, SCRIPT, "--dry-run", "--out", str(out), *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads((out / "gpu_suite.json").read_text())
    assert (out / "gpu_suite.log").is_file()
    assert not list(out.glob("*.tmp")), "the atomic write left a temp file"
    return results, done.stdout


def _ok(results: dict[str, Any], key: str) -> dict[str, Any]:
    step = results["steps"][key]
    assert step["status"] == "ok", (key, step.get("error"), step.get("traceback"))
    assert step["seconds"] > 0 and step["budget_s"] > 0 and step["target"] and step["headline"]
    return step["figures"]


def _check_parity(figures: dict[str, Any]) -> None:
    assert figures["interpreted"] is True and figures["device"] == "cpu"
    counts = figures["counts"]
    assert counts["total"] == counts["passed"] > 0 and counts["failed"] == counts["errors"] == 0
    assert set(figures["worst_rel_l2"]) == set(figures["max_rel_error"]) == {"float32", "bfloat16", "float16"}
    cases = figures["cases"]
    assert {c["dtype"] for c in cases} == {"float32", "bfloat16", "float16"}
    assert {c["channels"] for c in cases} == {32, 64}
    assert {c["kind"] for c in cases} == {"random", "border"}
    assert {c["path"] for c in cases} == {"default", "all-atomic"}
    for case in cases:
        assert case["pass"] is True and case["poisoned_buffers"] == 3
        assert set(case["errors"]) == OUTPUTS
        assert case["worst_rel_l2"] <= case["tolerance_rel_l2"]
        assert case["max_rel_error"] <= case["tolerance_max_rel"]


def _check_kernel(figures: dict[str, Any]) -> None:
    assert figures["copy_bandwidth_GBps"] > 0 and figures["backends"] == ["pytorch", "triton"]
    rows = figures["rows"]
    assert {r["backend"] for r in rows} == {"pytorch", "triton"}
    for row in rows:
        for phase in ("forward", "backward", "forward+backward"):
            assert {"ms", "floor_ms", "x_floor"} <= set(row[phase])
    assert all("speedup_vs_pytorch" in r for r in rows if r["backend"] == "triton")
    assert "targets" in figures and "met" in figures


def _check_train(step: dict[str, Any], figures: dict[str, Any]) -> None:
    combos = {(r["model"], r["precision"], r["with_cp"]) for r in figures["rows"]}
    assert combos == {("upernet-deit-b", p, cp) for p in ("bf16", "fp32") for cp in (False, True)} | {
        ("m2f-beit-l", p, True) for p in ("bf16", "fp32")
    }
    for row in figures["rows"]:
        assert row["status"] == "ok" and row["images_per_s"] > 0 and row["loss_finite"]
        assert "peak_allocated_GB" in row and row["ms_deform_attn"][0]["backend"] == "pytorch"
    upernet, m2f = step["targets"]
    assert upernet["threshold_images_per_s"] == 110 and upernet["ambitious_images_per_s"] == 160
    assert m2f["threshold_GB"] == 80 and upernet["met"] is None and m2f["met"] is None


def _check_eval(step: dict[str, Any], figures: dict[str, Any]) -> None:
    assert {(r["mode"], r["precision"]) for r in figures["rows"]} == {
        (m, p) for m in ("ss", "ms") for p in ("bf16", "fp32")
    }
    for row in figures["rows"]:
        assert row["status"] == "ok" and row["projected_val_s"] > 0 and "peak_allocated_GB" in row
    assert [t["threshold_s"] for t in step["targets"]] == [30, 480]


def _check_dist(figures: dict[str, Any]) -> None:
    assert figures["backend"] == "gloo" and figures["world_size"] == 1 and figures["ddp"] is True
    assert figures["batchnorm_modules"] > 0 and figures["sync_bn_modules"] == 0  # converted on CUDA only
    assert figures["loss_decreased"] is True and figures["last_loss"] < figures["first_loss"]
    assert len(figures["losses"]) == figures["iterations"] and all(figures["checks"].values())


def test_dry_run_runs_every_step(tmp_path: Path) -> None:
    results, stdout = _run_suite(tmp_path)
    assert set(results["steps"]) == {"a", "b", "c", "d", "e"}
    meta = results["meta"]
    assert not META_FIELDS - set(meta) and "NOT a measurement" in meta["mode"]
    assert meta["device"] == "cpu" and meta["triton_interpret"] == "1"
    _check_parity(_ok(results, "a"))
    _check_kernel(_ok(results, "b"))
    _check_train(results["steps"]["c"], _ok(results, "c"))
    _check_eval(results["steps"]["d"], _ok(results, "d"))
    _check_dist(_ok(results, "e"))
    table = stdout.strip().splitlines()[-8:]  # the closing table: header, rule, 5 steps, footer
    assert table[0].startswith("step") and [line.split()[0] for line in table[2:7]] == list("abcde")


def test_only_runs_the_selected_steps(tmp_path: Path) -> None:
    results, _ = _run_suite(tmp_path, "--only", "b")
    assert list(results["steps"]) == ["b"]
    _check_kernel(_ok(results, "b"))


@pytest.mark.parametrize("only", ["x", "a,,z", ","])
def test_only_rejects_unknown_steps(tmp_path: Path, only: str) -> None:
    done = subprocess.run(
        [sys.executable, SCRIPT, "--dry-run", "--out", str(tmp_path), "--only", only],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": "."},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 2 and "--only" in done.stderr
