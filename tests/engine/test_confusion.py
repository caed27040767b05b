"""The class confusion matrix: accumulated beside the IoU counts, carried by ``evaluate_model``, written as
CSV and heat map by ``vitadapter evaluate --out`` and the evaluate stage, logged to MLflow."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

import models
from micro_params import micro_params, write_params
from pipelines.cli import main
from pipelines.config.params import load_params
from pipelines.engine.checkpoints import save_checkpoint_file
from pipelines.engine.metrics import SegMetrics, confusion_matrix, iou_from_confusion
from pipelines.orchestration import stages
from pipelines.reporting.confusion import top_confused_pairs, write_confusion
from pipelines.runs.folder import BEST


def _read_csv(path: Path) -> tuple[list[str], np.ndarray]:
    rows = list(csv.reader(path.open()))
    return rows[0][1:], np.array([[int(v) for v in row[1:]] for row in rows[1:]])


def _miou_from(confusion: np.ndarray) -> float:
    return float(100.0 * np.nanmean(iou_from_confusion(confusion)))


def test_matrix_accumulates_in_the_same_pass_and_gives_the_same_miou() -> None:
    rng = np.random.default_rng(0)
    metrics = SegMetrics(num_classes=5)
    labelled = 0
    for _ in range(4):
        label = rng.integers(0, 5, (17, 23))
        label[rng.random(label.shape) < 0.2] = 255  # ignored pixels
        pred = np.where(
            rng.random(label.shape) < 0.6, np.where(label == 255, 0, label), rng.integers(0, 5, label.shape)
        )
        metrics.update(pred, label)
        labelled += int((label != 255).sum())
    out = metrics.compute()
    confusion = out["confusion"]
    assert confusion.shape == (5, 5) and int(confusion.sum()) == labelled
    assert np.array_equal(np.diag(confusion), metrics.totals[0])  # intersections
    assert np.array_equal(confusion.sum(axis=1), metrics.totals[3])  # label areas
    assert np.array_equal(confusion.sum(axis=0), metrics.totals[2])  # prediction areas
    assert _miou_from(confusion) == pytest.approx(out["mIoU"], abs=1e-12)
    # one image: labels on rows, predictions on columns
    assert confusion_matrix(np.array([[1, 1, 0]]), np.array([[0, 1, 255]]), 2).tolist() == [[0, 1], [0, 1]]


def test_files_at_150_classes(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    confusion = rng.integers(0, 50, (150, 150))
    confusion[np.arange(150), np.arange(150)] += 1000
    confusion[3, 7] = 900  # the most confused pair
    names = [f"class{i}" for i in range(150)]
    csv_path, png_path = write_confusion(confusion, names, tmp_path / "eval.confusion", title="test")
    rows = list(csv.reader(csv_path.open()))
    assert rows[0][1:] == names and [row[0] for row in rows[1:]] == names
    assert np.array_equal(np.array([[int(v) for v in row[1:]] for row in rows[1:]]), confusion)
    picture = cv2.imread(str(png_path))
    assert picture is not None and picture.shape[0] > 600 and picture.shape[1] > 1000
    top = top_confused_pairs(confusion, names)
    assert (top[0]["label"], top[0]["predicted"], top[0]["pixels"]) == ("class3", "class7", 900)
    assert len(top) == 25
    with pytest.raises(ValueError, match="150 class names do not match"):
        write_confusion(confusion[:10, :10], names, tmp_path / "bad")


def test_evaluate_command_and_stage_write_and_log_the_matrix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # the sqlite store's default artifact root is ./mlruns
    params = micro_params()
    params["paths"] = {key: str(tmp_path / value) for key, value in params["paths"].items()}
    params["tracking"] = {**params["tracking"], "uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    path = write_params(tmp_path / "params.yaml", params)
    loaded = load_params(path)
    stages.prepare_stage(loaded, "ade20k")
    run = loaded.runs["tiny"]
    torch.manual_seed(0)
    model = models.build_segmentor(run.model_config())
    checkpoint = save_checkpoint_file(
        {"config": run.config, "overrides": run.model_overrides(), "state_dict": model.state_dict()},
        loaded.run_dir("tiny") / BEST,
    )

    result = stages.evaluate_stage(loaded, "tiny", "ss")
    reports = Path(loaded.paths.reports) / "tiny"
    _, confusion = _read_csv(reports / "confusion_ss.csv")
    assert confusion.shape == (150, 150) and confusion.sum() > 0
    assert _miou_from(confusion) == pytest.approx(result["mIoU"], abs=1e-9)
    assert (reports / "confusion_ss.png").is_file()
    client = MlflowClient(loaded.tracking.uri)
    experiment = client.get_experiment_by_name(loaded.tracking.experiment)
    (evaluation,) = client.search_runs([experiment.experiment_id], "tags.`vitadapter.kind` = 'evaluation'")
    logged = {item.path for item in client.list_artifacts(evaluation.info.run_id, "confusion_ss")}
    assert logged == {"confusion_ss/confusion_ss.csv", "confusion_ss/confusion_ss.png"}

    out = tmp_path / "cli" / "metrics.json"
    args = [
        "evaluate",
        "--no-tracking",
        "--checkpoint",
        str(checkpoint),
        "--data",
        str(loaded.data_dir("ade20k")),
    ]
    assert main([*args, "--limit", "2", "--no-progress", "--out", str(out)]) == 0
    capsys.readouterr()
    names, from_cli = _read_csv(out.parent / "metrics.confusion.csv")
    assert names[0] == "wall" and (out.parent / "metrics.confusion.png").is_file()
    assert np.array_equal(from_cli, confusion)  # the same two images, the same counts
