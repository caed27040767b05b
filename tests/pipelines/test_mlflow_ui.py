"""The MLflow UI in a real headless Chromium (tools/mlflow_screenshots.py): a real ``mlflow server`` over a
store our tracker wrote; the runs table shows total loss, validation mIoU and ours beside the published
SS/MS mIoU with no column added by hand, a training run's page its summary and dataset, the reference
experiment its rows.

Needs Chromium (Debian's ``chromium``; ``.ci/run`` installs it) and the ``playwright`` package (test extras).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import models
from micro_params import ade_twin_shards
from pipelines.config.knobs import TrainParams
from pipelines.config.params import RunParams, Tracking
from pipelines.orchestration.tracked import data_inputs
from pipelines.reporting.records import TrainingCallback
from pipelines.reporting.tracking import Tracker

ROOT = Path(__file__).resolve().parents[2]
NAME = "upernet_deit_adapter_tiny_512_160k_ade20k"
CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium")) if p and Path(p).is_file()), None)

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or shutil.which("playwright", path=str(Path(sys.executable).parent)) is None,
    reason="needs Chromium (apt-get install chromium) and the playwright package (pip install -e '.[test]')",
)


def _store(tmp_path: Path) -> str:
    """A store as the pipeline leaves it: a training run with its curves and dataset inputs, its SS and MS
    evaluations, the reference experiment."""
    shards = ade_twin_shards(tmp_path, num_train=2, num_val=1, seed=1, min_size=32, max_size=48)
    uri = f"sqlite:///{tmp_path / 'ui.db'}"
    tracker = Tracker(Tracking(uri=uri), fallback_dir=tmp_path / "fallback")
    tracker.start_training_run(
        run_name="ade_run",
        config=models.get_config(NAME),
        run_params=RunParams(config=NAME, train=TrainParams(max_iters=4)),
        tags={"vitadapter.run": "ade_run"},
        parent=None,
        inputs=data_inputs(shards, {"train": "training", "val": "evaluation"}),
    )
    callback = TrainingCallback(tracker)
    for step in (1, 2, 3, 4):
        callback.on_log(step, {"decode.loss_ce": 1.0 / step, "loss": 1.5 / step, "lr": 1e-4 * step})
    callback.on_eval(4, {"mIoU": 37.123, "aAcc": 60.0, "mAcc": 50.0})
    tracker.end_run()
    for mode, miou, published in (("ss", 40.5, 42.6), ("ms", 41.25, 43.6)):
        tracker.log_evaluation(
            run_name="ade_run",
            mode=mode,
            metrics={
                "mode": mode,
                "mIoU": miou,
                "aAcc": 70.0,
                "mAcc": 55.0,
                "published_miou": published,
                "delta_miou": miou - published,
                "num_images": 1,
            },
            per_class={"name": ["wall"], "IoU": [miou], "Acc": [55.0]},
            artifacts=[],
            tags={"vitadapter.dataset": "ade20k"},
            inputs=data_inputs(shards, {"val": "evaluation"}),
        )
    tracker.sync_reference_experiment()
    return uri


def test_the_ui_shows_ours_against_the_paper(tmp_path: Path) -> None:
    uri = _store(tmp_path)
    out = tmp_path / "shots"
    command = [sys.executable, str(ROOT / "tools" / "mlflow_screenshots.py"), "--tracking-uri", uri]
    done = subprocess.run(
        [*command, "--out", str(out), "--chromium", CHROMIUM], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("runs_table.png", "run_page.png", "run_charts.png", "reference_table.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name  # a drawn page, not a blank one


# a second mlflow server and Chromium (minutes on 2 cores): the picture test above runs by default
@pytest.mark.slow
def test_a_missing_column_is_an_error_naming_it(tmp_path: Path) -> None:
    """The check can fail: a store whose runs lack the published metrics is reported, not pictured as fine."""
    uri = f"sqlite:///{tmp_path / 'bare.db'}"
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.create_experiment("vitadapter")
    run = client.create_run(experiment, tags={"vitadapter.kind": "train"}, run_name="bare")
    client.log_metric(run.info.run_id, "train/loss", 1.0)
    client.set_terminated(run.info.run_id)
    command = [sys.executable, str(ROOT / "tools" / "mlflow_screenshots.py"), "--tracking-uri", uri]
    done = subprocess.run(
        [*command, "--out", str(tmp_path / "shots"), "--chromium", CHROMIUM, "--wait", "5"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 1
    assert "runs_table.png: 'published_ss_mIoU'" in done.stderr
