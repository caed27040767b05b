"""The model-level benchmarks' ``--cpu-smoke`` modes run end to end and write complete result files.

Tiny overrides of the models on the CPU (issue 7, items 3b and 3c); the numbers mean nothing, the
fields must all be there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
META_FIELDS = {
    "smoke",
    "mode",
    "date",
    "command",
    "device",
    "torch",
    "triton",
    "cuda",
    "git_commit",
    "git_dirty",
    "timing",
    "ms_deform_attn_backends",
}


def _run(script: str, out: Path, *args: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / script), "--cpu-smoke", "--out", str(out), *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(out.read_text())
    meta = results["meta"]
    assert not META_FIELDS - set(meta), META_FIELDS - set(meta)
    assert meta["smoke"] is True and "NOT a benchmark" in meta["mode"]
    assert meta["device"] == "cpu" and meta["cuda"] is None
    assert f"{script.split('/')[-1]} --cpu-smoke" in meta["command"]
    assert meta["ms_deform_attn_backends"] == ["pytorch"]  # auto never picks triton on the CPU
    return results


def _check_backend(row: dict[str, Any], dtype: str) -> None:
    assert row["status"] == "ok", row
    assert row["images_per_s"] > 0
    assert row["peak_allocated_GB"] is None and "peak_reserved_GB" in row  # no per-run figure on the CPU
    assert [(e["backend"], e["value_dtype"]) for e in row["ms_deform_attn"]] == [("pytorch", dtype)]
    assert row["ms_deform_attn"][0]["calls"] > 0


def test_train_step_cpu_smoke(tmp_path: Path) -> None:
    results = _run("train_step/bench_train_step.py", tmp_path / "train.json", "--steps", "1")
    rows = results["rows"]
    combos = {(r["model"], r["batch"], r["precision"], r["with_cp"]) for r in rows}
    assert combos == {
        (model, batch, precision, with_cp)
        for model, batch in (("upernet-deit-b", 2), ("m2f-beit-l", 1))
        for precision in ("fp32", "bf16")
        for with_cp in (False, True)
    }
    for row in rows:
        _check_backend(
            row, "float32"
        )  # the core runs in float32 under autocast, as the reference's custom_fwd
        assert row["tiny_override"] is True and row["loss_finite"]
        assert {"mean", "median", "min", "max"} <= set(row["step_ms"])
        assert row["optimizer_groups"] > 1  # the recipe's parameter groups, not one
    # gradient checkpointing recomputes the adapter's deformable attention in the backward
    calls = {(r["model"], r["precision"], r["with_cp"]): r["ms_deform_attn"][0]["calls"] for r in rows}
    assert calls[("upernet-deit-b", "fp32", False)] == 10  # 4 injectors, 4 + 2 extractors
    assert calls[("upernet-deit-b", "fp32", True)] > 10
    upernet, m2f = results["targets"]
    assert upernet["threshold_images_per_s"] == 110 and upernet["met"] is None
    assert m2f["threshold_GB"] == 80 and m2f["met"] is None and len(m2f["rows"]) == 4


def test_eval_cpu_smoke(tmp_path: Path) -> None:
    results = _run("eval/bench_eval.py", tmp_path / "eval.json", "--images", "1")
    rows = results["rows"]
    combos = {(r["model"], r["mode"], r["precision"]) for r in rows}
    assert combos == {
        (model, mode, precision)
        for model in ("upernet-deit-b", "m2f-beit-l")
        for mode in ("ss", "ms")
        for precision in ("fp32", "bf16")
    }
    for row in rows:
        _check_backend(
            row, "float32"
        )  # the core runs in float32 under autocast, as the reference's custom_fwd
        assert row["windows"] >= row["forward_passes"] >= 1 and row["s_per_image"] > 0
    views = {(r["model"], r["mode"]): r["views"] for r in rows}
    # single scale: one view; multi-scale: the config's ratios, each flipped
    assert views == {
        ("upernet-deit-b", "ss"): 1,
        ("upernet-deit-b", "ms"): 12,
        ("m2f-beit-l", "ss"): 1,
        ("m2f-beit-l", "ms"): 6,
    }
