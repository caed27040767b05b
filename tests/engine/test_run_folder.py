"""Nothing lost, nothing silently wrong in a run folder: one writer, the best checkpoint stays the best,
a torn log line and orphaned temporaries after a kill, Ctrl-C, out-of-range knobs, a changed definition."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import models
from micro_params import ade_twin_shards, cli_model_args
from models.checkpoint import load_checkpoint_file
from pipelines.cli import main
from pipelines.config.knobs import TrainParams
from pipelines.runs.folder import RunFolder
from pipelines.runs.training import RunSpec, run_training

NAME = "upernet_deit_adapter_tiny_512_160k_ade20k"


@pytest.fixture(scope="module")
def twin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ade_twin_shards(
        tmp_path_factory.mktemp("twin"),
        num_train=8,
        num_val=2,
        seed=1,
        min_size=64,
        max_size=96,
        num_classes_used=4,
    )


def _spec(twin: Path, work_dir: Path, **knobs) -> RunSpec:
    values = {"max_iters": 2, "batch_size": 2, "global_batch": 2, "log_interval": 1, "eval_interval": 2}
    values.update(num_workers=0, pretrained="none", **knobs)
    overrides = models.zoo.resolved_overrides(NAME, preset="tiny")
    return RunSpec(
        name=NAME,
        data=twin,
        work_dir=work_dir,
        knobs=TrainParams(**values),
        overrides=overrides,
        progress=False,
    )


def test_resume_keeps_the_best_checkpoint_best(twin: Path, tmp_path: Path) -> None:
    """iter_N.pth is written before the evaluation at N, so its own best score is stale; resume trusts best.json."""
    run = tmp_path / "run"
    run_training(_spec(twin, run, checkpoint_interval=2))
    best_file = run / "best_mIoU.pth"
    assert json.loads((run / "best.json").read_text())["iteration"] == 2
    assert load_checkpoint_file(run / "iter_0000002.pth")["best_miou"] is None  # saved before evaluating
    # the evaluation at 2 was (say) excellent: a later, worse one must not replace it after a resume
    (run / "best.json").write_text(json.dumps({"iteration": 2, "metric": "mIoU", "value": 99.0}))
    before = best_file.read_bytes()
    run_training(_spec(twin, run, max_iters=4, checkpoint_interval=2))
    assert best_file.read_bytes() == before
    assert json.loads((run / "best.json").read_text())["value"] == 99.0
    # the resumed run's changed recipe value is warned about and recorded
    changes = [json.loads(line) for line in (run / "resume_changes.jsonl").read_text().splitlines()]
    assert changes[0]["iteration"] == 2 and changes[0]["changes"]["schedule.max_iters"] == [2, 4]


def test_a_torn_log_line_and_orphaned_temporaries_are_repaired_on_resume(
    twin: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    run_training(_spec(twin, run, checkpoint_interval=2))
    with (run / "train_log.jsonl").open("a") as handle:
        handle.write('{"iteration": 3, "loss": 0.5')  # a kill in the middle of a line
    orphan = run / ".iter_0000004.pth.abc123.tmp"
    orphan.write_bytes(b"half a checkpoint")
    run_training(_spec(twin, run, max_iters=3, checkpoint_interval=3))
    assert "skipping the torn last line" in caplog.text and "train_log.jsonl" in caplog.text
    assert [r["iteration"] for r in RunFolder(run).read_log()] == [1, 2, 3]
    assert not orphan.exists()


def test_a_second_writer_is_refused_naming_the_folder_and_the_holder(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path / "run")
    with folder.exclusive():
        code = "from pipelines.runs.folder import RunFolder; import sys\nwith RunFolder(sys.argv[1]).exclusive(): pass"
        other = subprocess.run([sys.executable, "-c", code, str(folder.path)], capture_output=True, text=True)
        assert other.returncode != 0
        assert f"run folder {folder.path} is in use by another process (PID {os.getpid()})" in other.stderr
    with folder.exclusive():  # released when the holder is done (or dies)
        pass


def test_two_train_commands_into_one_folder(twin: Path, tmp_path: Path) -> None:
    """The real commands: while one `vitadapter train` runs, a second into the same folder exits 1 at once."""
    run = tmp_path / "run"
    common = ["--data", str(twin), "--work-dir", str(run), "--pretrained", "none", "--num-workers", "0"]
    common += ["--batch-size", "2", "--global-batch", "2", "--no-progress", *cli_model_args()]
    first = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipelines.cli",
            "train",
            "--no-tracking",
            NAME,
            *common,
            "--max-iters",
            "400",
            "--eval-interval",
            "1000",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not (run / "train_log.jsonl").is_file():
            assert first.poll() is None, first.communicate()[1][-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.2)
        second = subprocess.run(
            [
                sys.executable,
                "-m",
                "pipelines.cli",
                "train",
                "--no-tracking",
                NAME,
                *common,
                "--max-iters",
                "2",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert second.returncode == 1
        assert f"run folder {run} is in use by another process (PID {first.pid})" in second.stderr
        # Ctrl-C: the running one writes a checkpoint and exits 130
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=180) == 130, first.communicate()[1][-2000:]
    finally:
        if first.poll() is None:
            first.kill()
    assert RunFolder(run).latest_checkpoint() is not None


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--max-iters", "0", "--max-iters: 0 is out of range (at least 1; leave it unset for the recipe's)"),
        ("--max-iters", "-5", "--max-iters: -5 is out of range"),
        ("--batch-size", "0", "--batch-size: 0 is out of range"),
        ("--keep-checkpoints", "0", "--keep-checkpoints: 0 is out of range"),
    ],
)
def test_out_of_range_knobs_are_errors_not_defaults(
    twin: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, flag: str, value: str, message: str
) -> None:
    args = [
        "train",
        "--no-tracking",
        NAME,
        "--data",
        str(twin),
        "--work-dir",
        str(tmp_path / "run"),
        flag,
        value,
    ]
    assert main(args) == 1
    assert message in caplog.text
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_an_evaluation_setting_never_retrains_and_a_changed_run_is_moved_aside(tmp_path: Path) -> None:
    """The real `vitadapter pipeline train`: eval.limit changes nothing; a weight-defining change keeps the old folder."""
    from micro_params import micro_params, write_params

    params = micro_params()
    params["paths"] = {key: str(tmp_path / value) for key, value in params["paths"].items()}
    params["tracking"] = {**params["tracking"], "enabled": False}
    params["runs"]["tiny"]["train"].update(max_iters=2, eval_interval=2, checkpoint_interval=2)
    path = write_params(tmp_path / "params.yaml", params)
    assert main(["pipeline", "prepare", "ade20k", "--params", str(path)]) == 0
    assert main(["pipeline", "train", "tiny", "--params", str(path)]) == 0
    run = tmp_path / "artifacts" / "runs" / "tiny"
    trained = (run / "iter_0000002.pth").read_bytes()
    mtime = (run / "iter_0000002.pth").stat().st_mtime_ns

    params["runs"]["tiny"]["eval"]["limit"] = 1  # an evaluation setting
    params["runs"]["tiny"]["train"]["log_interval"] = 1  # and knobs that do not change the weights
    params["runs"]["tiny"]["train"]["num_workers"] = 1
    write_params(path, params)
    assert main(["pipeline", "train", "tiny", "--params", str(path)]) == 0
    assert (run / "iter_0000002.pth").stat().st_mtime_ns == mtime  # the finished run was kept as it is

    params["runs"]["tiny"]["train"]["seed"] = 7  # changes the weights: a new run, the old one kept aside
    params["runs"]["tiny"]["train"]["num_workers"] = 0  # no loader processes forked from this test process
    write_params(path, params)
    assert main(["pipeline", "train", "tiny", "--params", str(path)]) == 0
    aside = [p for p in run.parent.iterdir() if p.name.startswith("tiny.stale-")]
    assert len(aside) == 1 and (aside[0] / "iter_0000002.pth").read_bytes() == trained
    assert (run / "iter_0000002.pth").read_bytes() != trained


def test_predict_keeps_inputs_of_the_same_name_apart_and_checks_paths_first(
    twin: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from pipelines.engine.checkpoints import save_checkpoint_file

    model = models.create_segmentor(NAME, preset="tiny")
    checkpoint = save_checkpoint_file({"state_dict": model.state_dict()}, tmp_path / "model.pth")
    images = sorted((twin.parent / "raw" / "ADEChallengeData2016" / "images" / "validation").glob("*.jpg"))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for folder, image in zip(("a", "b"), images, strict=True):
        (tmp_path / folder / "photo.jpg").write_bytes(image.read_bytes())
    args = [
        "predict",
        NAME,
        "--checkpoint",
        str(checkpoint),
        "--out",
        str(tmp_path / "out"),
        *cli_model_args(),
    ]
    assert main([*args, str(tmp_path / "a" / "photo.jpg"), str(tmp_path / "b" / "photo.jpg")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png") if "overlay" not in p.name) == [
        "photo.png",
        "photo_2.png",
    ]
    assert main([*args, str(tmp_path / "a" / "photo.jpg"), str(tmp_path / "nope.jpg")]) == 1
    assert f"no such image file: {tmp_path / 'nope.jpg'}" in caplog.text


def test_the_progress_line_leads_with_what_a_person_follows() -> None:
    from pipelines.engine.trainer import progress_line

    values = {"loss": 1.23456, "lr": 2e-4, "images_per_s": 12.34, "peak_memory_mb": 812.4}
    values.update({f"d{i}.loss_mask": 0.1 for i in range(30)})  # Mask2Former's per-layer terms
    line = progress_line(120, 400, 100, time.perf_counter() - 10.0, values)  # 20 iterations in 10 s
    assert line.startswith("iter 120/400 (30%) | loss 1.2346 | lr 2.00e-04 | eta 2m")
    assert line.endswith("| 12.3 img/s | mem 812 MB") and "loss_mask" not in line and len(line) < 120


def test_the_recipe_grad_clip_is_applied(twin: Path, tmp_path: Path) -> None:
    """`optimizer.grad_clip` (mmcv's OptimizerHook grad_clip) was accepted and ignored: it clips the global norm."""
    torch.manual_seed(0)  # what the run's initialisation does (seed 0), so the runs start from these weights
    model = models.create_segmentor(NAME, preset="tiny")
    start = {name: p.detach().clone() for name, p in model.named_parameters()}

    def moved(clip: float | None) -> float:
        spec = _spec(twin, tmp_path / f"run_{clip}", max_iters=1, eval_interval=100, checkpoint_interval=1)
        overrides = models.zoo.resolved_overrides(NAME, {"optimizer.grad_clip": clip}, preset="tiny")
        result = run_training(dataclasses.replace(spec, overrides=overrides))
        state = load_checkpoint_file(result.last_checkpoint)["state_dict"]
        return max(float((state[k] - start[k]).abs().max()) for k in start)

    # Adam moves every weight by about lr * g / (|g| + eps): a gradient clipped far below eps barely moves it
    assert moved(1e-12) < 1e-3 * moved(None)


def test_a_later_run_starts_from_the_final_checkpoint_whatever_the_evaluations(tmp_path: Path) -> None:
    """The strategy-2 hand-off follows the training definition alone: the stage run's final checkpoint, never
    its best-mIoU one (which depends on when and on how many images evaluations ran)."""
    from micro_params import micro_params, write_params
    from pipelines.config.params import load_params
    from pipelines.orchestration.stages import run_spec
    from pipelines.runs.training import check_finished_stage, stage_checkpoint_path

    params = micro_params()
    params["paths"] = {key: str(tmp_path / value) for key, value in params["paths"].items()}
    params["tracking"] = {**params["tracking"], "enabled": False}
    stage = params["runs"]["tiny"]
    stage["train"].update(max_iters=4, eval_interval=2, checkpoint_interval=2, keep_checkpoints=2)
    params["runs"]["later"] = {**copy.deepcopy(stage), "init_from": "tiny"}
    path = write_params(tmp_path / "params.yaml", params)
    assert main(["pipeline", "prepare", "ade20k", "--params", str(path)]) == 0
    assert main(["pipeline", "train", "tiny", "--params", str(path)]) == 0
    folder = tmp_path / "artifacts" / "runs" / "tiny"
    assert (
        folder / "best_mIoU.pth"
    ).is_file()  # two evaluations chose a best one: not what the next run takes

    def handoff(params_file: Path) -> Path:
        loaded = load_params(params_file)
        spec = run_spec(loaded, "later")
        return stage_checkpoint_path(spec.config(), spec)

    assert handoff(path) == folder / "iter_0000004.pth"
    definition = load_params(path).training_definition("later")
    # other evaluation settings of the stage: neither run's definition changes, nor the starting weights
    stage["train"].update(eval_interval=1, eval_limit=1)
    stage["eval"]["limit"] = 1
    write_params(path, params)
    assert load_params(path).training_definition("later") == definition
    assert handoff(path) == folder / "iter_0000004.pth"
    # a stage that stopped before its planned iterations is not a stage to start from
    with pytest.raises(ValueError, match=r"stopped at iteration 2 of 4.*finish its training first"):
        check_finished_stage(load_checkpoint_file(folder / "iter_0000002.pth"), folder / "iter_0000002.pth")
    check_finished_stage(load_checkpoint_file(folder / "iter_0000004.pth"), folder / "iter_0000004.pth")
