"""The trainer on a synthetic ADE20K twin: learning, two-process equivalence, kill-and-resume, evaluate/predict."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import models
from data.prepare import prepare_dataset
from data.synthetic import synthesize
from micro_params import cli_model_args
from models.checkpoint import load_checkpoint_file
from pipelines.cli import main
from pipelines.config.knobs import TrainParams
from pipelines.runs.training import RunSpec, run_training

NAME = "upernet_deit_adapter_tiny_512_160k_ade20k"
CLASSES_USED = 4
FAST_OVERRIDES = {"optimizer.lr": 1e-3, "schedule.warmup_iters": 10}
FAST = models.zoo.resolved_overrides(NAME, FAST_OVERRIDES, preset="tiny")


@pytest.fixture(scope="module")
def twin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ade_twin")
    report = synthesize(
        "ade20k",
        root / "raw",
        num_train=24,
        num_val=6,
        seed=3,
        min_size=64,
        max_size=112,
        num_classes_used=CLASSES_USED,
    )
    prepare_dataset("ade20k", report.root, root / "prepared")
    return root / "prepared"


def _knobs(**kwargs) -> TrainParams:
    values = {"log_interval": 10, "deterministic": True, "pretrained": "none", "num_workers": 0}
    values.update(kwargs)
    return TrainParams(**values)


def test_tiny_model_learns_the_twin(twin: Path, tmp_path: Path) -> None:
    spec = RunSpec(
        name=NAME,
        data=twin,
        work_dir=tmp_path / "run",
        knobs=_knobs(max_iters=150, batch_size=4, global_batch=4, eval_interval=150),
        overrides=FAST,
        progress=False,
    )
    result = run_training(spec)
    # 4 classes used: chance is ~1/4 accuracy and far lower mIoU
    assert result.best_miou is not None and result.best_miou > 50.0, result.best_miou
    assert result.history[-1]["loss"] < 0.6 * result.history[0]["loss"]
    assert (tmp_path / "run" / "best_mIoU.pth").is_file()
    assert json.loads((tmp_path / "run" / "key_report.json").read_text())["pretrained"] is None


def _initial_weights() -> dict[str, torch.Tensor]:
    """The weights a run starts from (seeded initialisation of the same overrides)."""
    torch.manual_seed(0)
    return models.create_segmentor(NAME, FAST).state_dict()


def _final_weights(work_dir: Path) -> dict[str, torch.Tensor]:
    state = load_checkpoint_file(sorted(work_dir.glob("iter_*.pth"))[-1])
    return state["state_dict"]


def _train_cmd(twin: Path, work_dir: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--no-tracking",
        NAME,
        "--data",
        str(twin),
        "--work-dir",
        str(work_dir),
        "--pretrained",
        "none",
        "--num-workers",
        "0",
        "--deterministic",
        "--no-progress",
        "--eval-interval",
        "1000",
        *cli_model_args(FAST_OVERRIDES),
        *extra,
    ]


def test_two_processes_equal_one_with_the_same_global_batch(twin: Path, tmp_path: Path) -> None:
    # no warmup: every step moves the weights by ~lr, far above the tolerance below
    common = ["--max-iters", "6", "--batch-size", "2", "--global-batch", "4", "--checkpoint-interval", "1"]
    common += ["--keep-checkpoints", "6", "--set", "schedule.warmup_iters=0", "--log-interval", "1"]
    assert main(_train_cmd(twin, tmp_path / "one", *common)) == 0  # 1 process x 2 x accumulation 2
    # two torchrun "nodes" of one process each, meeting through a c10d rendezvous on loopback: the multi-node
    # path of the README (a single node with --nproc-per-node 2 runs the same code)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = _train_cmd(twin, tmp_path / "two", *common)
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--node-rank",
                str(rank),
                "--nproc-per-node",
                "1",
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                "127.0.0.1:29517",
                "--rdzv-id",
                "equivalence",
                "-m",
                "pipelines.cli",
                *command,
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    errors = [node.communicate(timeout=600)[1] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], errors[0][-3000:] + errors[1][-3000:]
    # the losses of every iteration (forward values of the same samples, batch groups and randomness)
    logs = [
        [json.loads(line) for line in (tmp_path / run / "train_log.jsonl").read_text().splitlines()]
        for run in ("one", "two")
    ]
    assert [r["iteration"] for r in logs[0]] == [r["iteration"] for r in logs[1]] == list(range(1, 7))
    for a, b in zip(*logs, strict=True):
        for term in ("loss", "decode.loss_seg", "aux.loss_seg"):
            assert b[term] == pytest.approx(a[term], rel=1e-4), (a["iteration"], term)
    # the weights after the first optimizer step: parameters agree (BatchNorm running statistics are
    # per-process buffers: DDP keeps rank 0's, an accumulating process updates them per micro-batch). Adam's
    # first step is lr * g / (|g| + eps): an element whose gradient is near zero can move by up to lr on
    # rounding alone, every other one agrees to float precision.
    one, two = (
        load_checkpoint_file(tmp_path / run / "iter_0000001.pth")["state_dict"] for run in ("one", "two")
    )
    buffers = {k for k in one if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    compared = [k for k in one if k not in buffers]
    assert len(compared) > 300
    diffs = torch.cat([(two[k] - one[k]).abs().flatten() for k in compared])
    start = _initial_weights()
    moved = torch.cat([(one[k] - start[k]).abs().flatten() for k in compared])
    assert moved.median() > 0.5 * FAST["optimizer.lr"]  # the step really moved the weights
    assert (diffs <= 1e-6).float().mean() > 0.999, (diffs <= 1e-6).float().mean()
    assert diffs.max() <= 2 * FAST["optimizer.lr"]


def test_sigkill_and_resume_gives_the_uninterrupted_weights(twin: Path, tmp_path: Path) -> None:
    args = ["--max-iters", "24", "--batch-size", "2", "--global-batch", "2", "--checkpoint-interval", "8"]
    assert main(_train_cmd(twin, tmp_path / "straight", *args)) == 0
    command = [sys.executable, "-m", "pipelines.cli", *_train_cmd(twin, tmp_path / "killed", *args)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (tmp_path / "killed" / "iter_0000008.pth").exists():
        assert process.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "killed" / "iter_0000024.pth").exists()
    assert main(_train_cmd(twin, tmp_path / "killed", *args)) == 0  # the same command resumes
    straight, resumed = _final_weights(tmp_path / "straight"), _final_weights(tmp_path / "killed")
    for key in straight:
        assert torch.equal(resumed[key], straight[key]), key


def test_sigterm_writes_a_checkpoint_and_exits_143(twin: Path, tmp_path: Path) -> None:
    args = ["--max-iters", "500", "--batch-size", "2", "--global-batch", "2", "--checkpoint-interval", "1000"]
    command = [
        sys.executable,
        "-m",
        "pipelines.cli",
        *_train_cmd(twin, tmp_path / "run", *args, "--log-interval", "1"),
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    line = ""
    while "iter 2/500" not in line:
        line = process.stderr.readline()
        assert line or process.poll() is None, "the run ended early"
        assert time.monotonic() < deadline
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 143
    saved = sorted((tmp_path / "run").glob("iter_*.pth"))
    assert len(saved) == 1 and load_checkpoint_file(saved[0])["iteration"] >= 2


def test_evaluate_and_predict_from_an_official_checkpoint(twin: Path, tmp_path: Path, capsys) -> None:
    spec = RunSpec(
        name=NAME,
        data=twin,
        work_dir=tmp_path / "run",
        knobs=_knobs(max_iters=30, batch_size=4, global_batch=4, eval_interval=1000),
        overrides=FAST,
        progress=False,
    )
    run_training(spec)
    sets = cli_model_args()
    official = tmp_path / "official.pth"
    assert (
        main(
            [
                "checkpoint",
                "export",
                NAME,
                str(sorted((tmp_path / "run").glob("iter_*.pth"))[-1]),
                "--out",
                str(official),
                *sets,
            ]
        )
        == 0
    )
    metrics_file = tmp_path / "metrics.json"
    for mode in ("ss", "ms"):
        code = main(
            [
                "evaluate",
                "--no-tracking",
                NAME,
                "--checkpoint",
                str(official),
                "--data",
                str(twin),
                "--mode",
                mode,
                "--out",
                str(metrics_file),
                "--no-progress",
                *sets,
            ]
        )
        assert code == 0
        metrics = json.loads(metrics_file.read_text())
        assert metrics["mode"] == mode and metrics["num_images"] == 6 and 0.0 <= metrics["mIoU"] <= 100.0
        assert metrics["published_miou"] == (42.6 if mode == "ss" else 43.6)
        assert len(metrics["per_class"]["IoU"]) == 150
        assert metrics["deform_attn_backend"] == "pytorch"  # what ran on the CPU, recorded with the result
    assert '"mIoU"' in capsys.readouterr().out  # the metrics are printed too
    # the raw official folder works as well as the shards
    raw = twin.parent / "raw"
    assert (
        main(
            [
                "evaluate",
                "--no-tracking",
                NAME,
                "--checkpoint",
                str(official),
                "--data",
                str(raw),
                "--no-progress",
                *sets,
            ]
        )
        == 0
    )
    images = sorted((raw / "ADEChallengeData2016" / "images" / "validation").glob("*.jpg"))[:2]
    out = tmp_path / "pred"
    assert (
        main(["predict", NAME, "--checkpoint", str(official), "--out", str(out), *sets, *map(str, images)])
        == 0
    )
    for image in images:
        pred = cv2.imread(str(out / f"{image.stem}.png"), cv2.IMREAD_UNCHANGED)
        original = cv2.imread(str(image))
        assert pred.shape == original.shape[:2] and pred.dtype == np.uint8 and pred.max() < 150
        overlay = cv2.imread(str(out / f"{image.stem}_overlay.png"))
        assert overlay.shape[0] >= original.shape[0] and overlay.shape[1] > original.shape[1]


def test_tiny_mask2former_trains_evaluates_and_predicts_through_the_commands(
    twin: Path, tmp_path: Path
) -> None:
    name = "mask2former_beit_adapter_large_640_160k_ade20k"
    sets = cli_model_args()
    common = ["--data", str(twin), "--pretrained", "none", "--num-workers", "0", "--no-progress"]
    train = [
        "train",
        "--no-tracking",
        name,
        "--work-dir",
        str(tmp_path / "run"),
        "--max-iters",
        "4",
        "--batch-size",
        "2",
    ]
    assert main([*train, "--global-batch", "2", "--eval-interval", "4", *common, *sets]) == 0
    checkpoint = tmp_path / "run" / "iter_0000004.pth"
    for mode in ("ss", "ms"):  # MS: the SETR_Resize scales of the BEiT 640 config, with flip
        out = tmp_path / f"{mode}.json"
        args = [
            "evaluate",
            "--no-tracking",
            name,
            "--checkpoint",
            str(checkpoint),
            "--data",
            str(twin),
            "--mode",
            mode,
        ]
        assert main([*args, "--out", str(out), "--no-progress"]) == 0  # overrides come from the checkpoint
        metrics = json.loads(out.read_text())
        assert metrics["num_images"] == 6 and metrics["published_miou"] == (58.3 if mode == "ss" else 59.0)
    image = sorted((twin.parent / "raw" / "ADEChallengeData2016" / "images" / "validation").glob("*.jpg"))[0]
    assert (
        main(["predict", name, "--checkpoint", str(checkpoint), "--out", str(tmp_path / "pred"), str(image)])
        == 0
    )
    assert (
        cv2.imread(str(tmp_path / "pred" / f"{image.stem}.png"), cv2.IMREAD_UNCHANGED).shape
        == cv2.imread(str(image)).shape[:2]
    )
