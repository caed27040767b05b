"""Stand-alone ``vitadapter train`` and ``vitadapter evaluate`` are recorded in MLflow as the pipeline records
its runs (a real sqlite store): the training run with its dataset inputs, curves, published numbers and the
summary on its page; the evaluation as its child with the published number beside ours; the experiment
carries the runs-table view the README's address opens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from micro_params import ade_twin_shards, cli_model_args
from pipelines.cli import main
from pipelines.reporting.mlflow_views import VIEW_TAG, runs_table_url, runs_view_state, ui_hint

NAME = "upernet_deit_adapter_tiny_512_160k_ade20k"


@pytest.fixture(scope="module")
def twin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ade_twin_shards(
        tmp_path_factory.mktemp("ade_twin"),
        num_train=8,
        num_val=2,
        seed=5,
        min_size=64,
        max_size=96,
        num_classes_used=3,
    )


def test_train_and_evaluate_commands_are_recorded_like_pipeline_runs(
    twin: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the sqlite store's artifacts (./mlruns) stay in the test's folder
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    tracking = ["--tracking-uri", uri, "--experiment", "solo"]
    work = tmp_path / "my_run"
    knobs = ["--max-iters", "2", "--batch-size", "2", "--global-batch", "2", "--eval-interval", "2"]
    common = ["--pretrained", "none", "--num-workers", "0", "--no-progress", *cli_model_args()]
    train = ["train", NAME, "--data", str(twin), "--work-dir", str(work), *knobs, *common, *tracking]
    assert main(train) == 0
    evaluate = ["evaluate", "--checkpoint", str(work / "iter_0000002.pth"), "--data", str(twin)]
    assert main([*evaluate, "--no-progress", *tracking]) == 0

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("solo")
    assert json.loads(experiment.tags[VIEW_TAG]) == runs_view_state()
    (training,) = client.search_runs([experiment.experiment_id], "tags.`vitadapter.kind` = 'train'")
    assert training.info.run_name == "my_run" and training.info.status == "FINISHED"
    assert training.data.tags["vitadapter.run"] == "my_run" and training.data.tags["dataset"] == "ade20k"
    assert training.data.tags["vitadapter.preset"] == "tiny"
    metrics = training.data.metrics
    assert {"train/loss", "train/lr", "val/mIoU", "published_ss_mIoU", "ss_mIoU"} <= set(metrics)
    assert metrics["published_ss_mIoU"] == 42.6  # the DeiT-T UperNet row of the published table
    assert training.data.params["schedule.max_iters"] == "2"  # what ran, not the recipe's 160k
    assert training.data.params["deform_attn_backend"] == "pytorch"  # the backend that ran (on a CPU)
    inputs = {(d.dataset.name, d.tags[0].value) for d in training.inputs.dataset_inputs}
    assert inputs == {("ade20k/train", "training"), ("ade20k/val", "evaluation")}
    description = training.data.tags["mlflow.note.content"]
    assert f"| SS mIoU | {metrics['ss_mIoU']:.2f} | 42.60 |" in description  # refreshed by the evaluation
    assert "| MS mIoU | - | 43.60 |" in description

    (evaluation,) = client.search_runs([experiment.experiment_id], "tags.`vitadapter.kind` = 'evaluation'")
    assert evaluation.data.tags["mlflow.parentRunId"] == training.info.run_id
    assert evaluation.data.tags["dataset"] == "ade20k"
    assert evaluation.data.metrics["published_ss_mIoU"] == 42.6
    assert evaluation.data.metrics["ss_mIoU"] == metrics["ss_mIoU"]
    assert round(evaluation.data.metrics["mIoU"], 2) == evaluation.data.metrics["mIoU"]  # as papers print it
    assert [d.dataset.name for d in evaluation.inputs.dataset_inputs] == ["ade20k/val"]


def test_no_tracking_writes_no_store(twin: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    work = tmp_path / "quiet"
    args = [
        "train",
        NAME,
        "--data",
        str(twin),
        "--work-dir",
        str(work),
        "--max-iters",
        "1",
        "--batch-size",
        "2",
    ]
    args += [
        "--global-batch",
        "2",
        "--pretrained",
        "none",
        "--num-workers",
        "0",
        "--no-progress",
        "--no-tracking",
    ]
    assert main([*args, *cli_model_args()]) == 0
    assert (work / "iter_0000001.pth").is_file()
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


def test_ui_addresses() -> None:
    url = runs_table_url("http://mlflow.example:5000/", "7")
    assert url == (
        "http://mlflow.example:5000/#/experiments/7/runs?workflowType=machine_learning&viewStateShareKey=vitadapter"
    )
    assert ui_hint("http://mlflow.example:5000", "7") == url
    hint = ui_hint("sqlite:///mlflow.db", "1", port=5001)
    assert hint.startswith(
        "mlflow server --backend-store-uri sqlite:///mlflow.db --port 5001, then http://127.0.0.1:5001/"
    )
