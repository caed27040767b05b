"""A step whose loss or gradient norm is not finite: the run stops before the update, naming the iteration,
the terms and the last good checkpoint (log, MLflow and exit status agree), or with ``nonfinite_steps: skip``
the step is dropped and counted; fp16's loss-scaler skips are counted and a long run of them is divergence.

The NaNs are real: a huge learning rate (``--set optimizer.lr=1.0e+12``) diverges the tiny models, and the
trainer's debugging knob ``debug_nan_at`` feeds NaN images at a chosen iteration (both heads: the whole forward,
Mask2Former's matcher included, is then non-finite)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

import models
from micro_params import ade_twin_shards
from models.checkpoint import load_checkpoint_file
from pipelines.cli import main
from pipelines.config.knobs import TrainParams
from pipelines.engine.distributed import DistInfo
from pipelines.engine.plan import resolve_plan
from pipelines.engine.step_guard import StepGuard, TrainingFailedError
from pipelines.runs.folder import RunFolder
from pipelines.runs.training import RunSpec, run_training

UPERNET = "upernet_deit_adapter_tiny_512_160k_ade20k"
MASK2FORMER = "mask2former_beit_adapter_large_640_160k_ade20k"


@pytest.fixture(scope="module")
def twin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ade_twin_shards(
        tmp_path_factory.mktemp("twin"),
        num_train=8,
        num_val=2,
        seed=4,
        min_size=64,
        max_size=96,
        num_classes_used=4,
    )


def _spec(twin: Path, work_dir: Path, name: str = UPERNET, overrides: dict | None = None, **knobs) -> RunSpec:
    values = {"max_iters": 3, "batch_size": 2, "global_batch": 2, "log_interval": 1, "eval_interval": 100}
    values.update(num_workers=0, pretrained="none", checkpoint_interval=1, keep_checkpoints=5)
    values.update(knobs)
    return RunSpec(
        name=name,
        data=twin,
        work_dir=work_dir,
        knobs=TrainParams(**values),
        overrides=models.zoo.resolved_overrides(name, overrides, preset="tiny"),
        progress=False,
    )


def _all_finite(state: dict[str, torch.Tensor]) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_a_diverging_run_stops_at_its_first_nan_step_and_says_so_everywhere(
    twin: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The issue's run: the tiny UperNet with lr 1e12 logged `loss nan`, trained on and wrote NaN checkpoints."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    work = tmp_path / "run"
    args = ["train", UPERNET, "--data", str(twin), "--work-dir", str(work), "--tracking-uri", uri]
    args += ["--max-iters", "6", "--batch-size", "2", "--global-batch", "2", "--checkpoint-interval", "1"]
    args += ["--keep-checkpoints", "6", "--eval-interval", "1", "--log-interval", "1", "--pretrained", "none"]
    args += ["--num-workers", "0", "--no-progress", "--preset", "tiny", "--set", "optimizer.lr=1.0e+12"]
    assert main(args) == 1
    message = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"][-1]
    # the training log's last record says the same, at the iteration that failed
    failed = RunFolder(work).read_log()[-1]
    n = failed["iteration"]
    assert failed == {"iteration": n, "failed": "nonfinite", "error": message}
    assert "\n" not in message and message.startswith(f"iteration {n}: the loss is not finite (")
    assert "decode.loss_seg=nan" in message and "aux.loss_seg=nan" in message
    last = work / f"iter_{n - 1:07d}.pth"
    assert f"the last good checkpoint is {last} (rerunning the same command resumes from it)" in message
    assert "--nonfinite-steps skip" in message
    # nothing of the poisoned step was written: no checkpoint of it, the best from an earlier, finite one
    assert n >= 2 and [p.name for p in sorted(work.glob("iter_*.pth"))][-1] == last.name
    assert _all_finite(load_checkpoint_file(last)["state_dict"])
    assert json.loads((work / "best.json").read_text())["iteration"] < n
    assert _all_finite(load_checkpoint_file(work / "best_mIoU.pth")["state_dict"])
    # MLflow: the run FAILED, with the same reason
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("vitadapter")
    (run,) = client.search_runs([experiment.experiment_id], "tags.`vitadapter.kind` = 'train'")
    assert run.info.status == "FAILED"
    assert run.data.tags["vitadapter.failure"] == f"TrainingFailedError: {message}"


def test_an_injected_nan_stops_mask2former_before_the_update(twin: Path, tmp_path: Path) -> None:
    """NaN predictions go through the Hungarian matcher (it used to raise there); the check names the terms."""
    with pytest.raises(TrainingFailedError) as caught:
        run_training(_spec(twin, tmp_path / "run", MASK2FORMER, debug_nan_at=2))
    error = caught.value
    assert error.iteration == 2 and error.kind == "nonfinite"
    assert error.last_checkpoint == tmp_path / "run" / "iter_0000001.pth"
    message = str(error)
    assert message.startswith("iteration 2: the loss is not finite (") and "loss_cls" in message
    assert "more; gradient norm nan)" in message  # its 30 terms: six named, the rest counted
    assert [p.name for p in (tmp_path / "run").glob("*.pth")] == ["iter_0000001.pth"]


def test_skip_drops_the_nan_step_counts_it_and_trains_on(twin: Path, tmp_path: Path) -> None:
    work = tmp_path / "run"
    result = run_training(_spec(twin, work, nonfinite_steps="skip", debug_nan_at=2))
    assert result.iterations == 3
    one, two, three = (load_checkpoint_file(work / f"iter_{i:07d}.pth") for i in (1, 2, 3))
    # the dropped step changed nothing: not the weights, not the BatchNorm statistics its NaN forward poisoned
    for key, value in one["state_dict"].items():
        assert torch.equal(two["state_dict"][key], value), key
    assert _all_finite(three["state_dict"])
    assert not torch.equal(
        three["state_dict"]["decode_head.conv_seg.weight"], one["state_dict"]["decode_head.conv_seg.weight"]
    )
    records = RunFolder(work).read_log()
    assert records[1]["iteration"] == 2 and records[1]["loss"] is None and records[1]["skipped_steps"] == 1
    assert records[2]["skipped_steps"] == 1 and math.isfinite(records[2]["loss"])
    assert three["health"] == {"skipped_steps": 1, "consecutive_skips": 0, "skipped_samples": 0}
    # the recipe diff records it: in the run folder and in the checkpoints written after it
    diff = json.loads((work / "recipe_diff.json").read_text())
    (skipped,) = [d for d in diff["deviations"] if d["key"] == "skipped_steps"]
    assert skipped["ours"] == 1 and skipped["published"] == 0
    assert diff["setup"]["plan"]["nonfinite_steps"] == "skip"
    assert three["recipe_diff"] == diff
    assert not [d for d in one["recipe_diff"]["deviations"] if d["key"] == "skipped_steps"]


def test_fp16_overflow_skips_are_counted_and_too_many_in_a_row_stop_the_run(
    twin: Path, tmp_path: Path
) -> None:
    work = tmp_path / "run"
    spec = _spec(
        twin,
        work,
        overrides={"optimizer.lr": 1e12},
        precision="fp16",
        max_iters=8,
        max_consecutive_skips=1,
        checkpoint_interval=2,
    )
    with pytest.raises(TrainingFailedError) as caught:
        run_training(spec)
    error = caught.value
    assert error.kind == "diverged"
    assert str(error).startswith(
        f"iteration {error.iteration}: 2 steps in a row were skipped (fp16 overflow, loss scale now "
    )
    assert "more than --max-consecutive-skips 1: the run diverged" in str(error)
    # counted and logged: the iteration before the failing one was the first skip of the two
    logged = {r["iteration"]: r.get("skipped_steps", 0) for r in RunFolder(work).read_log() if "loss" in r}
    assert logged[error.iteration - 1] == logged.get(error.iteration - 2, 0) + 1
    last = error.last_checkpoint
    assert last is not None and _all_finite(load_checkpoint_file(last)["state_dict"])


def test_an_update_that_overflows_float32_stops_the_run_before_any_checkpoint(
    twin: Path, tmp_path: Path
) -> None:
    """lr 1e45: AdamW's step size overflows float32 and torch refuses it: the same one-line failure."""
    work = tmp_path / "run"
    with pytest.raises(TrainingFailedError) as caught:
        run_training(_spec(twin, work, overrides={"optimizer.lr": 1e45, "schedule.warmup_iters": 0}))
    assert caught.value.kind == "nonfinite" and caught.value.iteration == 1
    assert str(caught.value).startswith("iteration 1: the optimizer's update overflows (")
    assert "no checkpoint was written yet (a rerun starts afresh)" in str(caught.value)
    assert not list(work.glob("*.pth")) and not list(work.glob(".*.tmp"))


def test_non_finite_weights_are_never_written_or_evaluated(tmp_path: Path) -> None:
    """The last guard before a checkpoint or an evaluation (an update can overflow with a finite gradient)."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    plan = resolve_plan(
        models.get_config(UPERNET, preset="tiny"), TrainParams(), world_size=1, work_dir=tmp_path
    )
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters())
    guard = StepGuard(
        plan,
        dist,
        model,
        optimizer,
        torch.amp.GradScaler("cpu", enabled=False),
        latest_checkpoint=lambda: tmp_path / "iter_0000004.pth",
        append_record=lambda record: None,
    )
    guard.check_weights(5, "writing a checkpoint of")  # finite: nothing happens
    with torch.no_grad():
        model[1].running_var[1] = float("inf")
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(TrainingFailedError) as caught:
        guard.check_weights(5, "writing a checkpoint of")
    assert str(caught.value) == (
        "iteration 5: the weights are not finite after the update (0.weight, 1.running_var): not writing a "
        f"checkpoint of them; the last good checkpoint is {tmp_path / 'iter_0000004.pth'} (rerunning the same "
        "command resumes from it); lower the learning rate before rerunning"
    )
