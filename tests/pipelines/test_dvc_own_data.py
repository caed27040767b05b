"""Your own data through the real `dvc repro`: a dataset card in params.yaml is prepared, fine-tuned from an
ADE20K checkpoint, evaluated and reported ("no published row") like the official datasets, and an edited
card makes its prepare stage stale."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import models
import models.zoo
from micro_params import TINY_UPERNET_OVERRIDES, micro_params, write_params
from models.builder import build_segmentor
from own_data import CLASSES, write_ade_layout
from pipelines.config.params import load_params
from pipelines.orchestration.dvcgraph import render_dvc_yaml

BIN = Path(sys.executable).parent
ENTRY = "upernet_deit_adapter_tiny_512_160k_ade20k"
GIT_ID = {
    "GIT_AUTHOR_NAME": "test",
    "GIT_AUTHOR_EMAIL": "test@example.invalid",
    "GIT_COMMITTER_NAME": "test",
    "GIT_COMMITTER_EMAIL": "test@example.invalid",
}


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(args)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


# five stage processes, each importing torch, timm and mlflow: minutes on 2 shared cores
@pytest.mark.slow
def test_dvc_repro_prepares_trains_evaluates_and_reports_a_card(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "repo"
    root.mkdir()
    env = {
        **os.environ,
        **GIT_ID,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    write_ade_layout(root / "own" / "toppings", num_train=4, num_val=2)
    _run([str(BIN / "vitadapter"), "data", "init", "own/toppings", "--out", "toppings.yaml"], root, env)
    card = yaml.safe_load((root / "toppings.yaml").read_text())
    card.update(classes=list(CLASSES), ignore_index=[255, 7])
    (root / "toppings.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
    # an ADE20K model of the tiny preset (150 classes) to start from
    overrides = models.zoo.resolved_overrides(ENTRY, preset="tiny")
    ade = build_segmentor(models.get_config(ENTRY, overrides))
    torch.save({"config": ENTRY, "overrides": overrides, "state_dict": ade.state_dict()}, root / "ade.pth")

    tiny = micro_params()["runs"]["tiny"]
    params = micro_params(
        datasets={"toppings": {"source": "card", "card": "toppings.yaml", "skip_unpaired": True}},
        runs={
            "own": {
                **tiny,
                "data": "toppings",
                "overrides": TINY_UPERNET_OVERRIDES,
                "init_from": "ade.pth",
                "train": {**tiny["train"], "max_iters": 2, "eval_interval": 2, "checkpoint_interval": 2},
            }
        },
    )
    write_params(root / "params.yaml", params)
    monkeypatch.chdir(root)  # params.yaml's paths are relative to the repository root
    dvc_yaml = render_dvc_yaml(load_params("params.yaml"), raw=params)
    graph = yaml.safe_load(dvc_yaml)["stages"]
    assert graph["prepare_toppings"]["deps"] == [
        "toppings.yaml",
        "own/toppings/images/training",
        "own/toppings/annotations/training",
        "own/toppings/images/validation",
        "own/toppings/annotations/validation",
    ]
    assert "runs.own.data" in graph["train_own"]["params"][0]["params.yaml"]
    (root / "dvc.yaml").write_text(dvc_yaml)
    (root / ".gitignore").write_text("mlflow.db\n")
    _run(["git", "init", "-q"], root, env)
    _run([str(BIN / "dvc"), "init", "-q"], root, env)
    _run(["git", "add", "-A"], root, env)
    _run(["git", "commit", "-qm", "own data"], root, env)

    first = _run([str(BIN / "dvc"), "repro"], root, env)
    for stage in ("prepare_toppings", "weights", "train_own", "evaluate_own", "report"):
        assert f"Running stage '{stage}'" in first.stdout, stage
    index = json.loads((root / "artifacts" / "data" / "toppings" / "index.json").read_text())
    assert index["class_names"] == list(CLASSES) and index["source"]["kind"] == "own"
    assert [s["file"] for s in index["splits"]["train"]["skipped"]] == ["no_label.jpg"]
    keys = json.loads((root / "artifacts" / "runs" / "own" / "key_report.json").read_text())
    assert keys["init_from"]["reinitialised"] == [
        "decode_head.conv_seg.weight",
        "decode_head.conv_seg.bias",
        "auxiliary_head.conv_seg.weight",
        "auxiliary_head.conv_seg.bias",
    ]
    numbers = json.loads((root / "metrics" / "own" / "eval_ss.json").read_text())
    assert "mIoU" in numbers and "published_miou" not in numbers and "delta_miou" not in numbers
    record = json.loads((root / "artifacts" / "reports" / "records" / "own" / "eval_ss.json").read_text())
    assert record["published"] == "no published row" and record["delta_miou"] is None
    per_class = json.loads((root / "artifacts" / "reports" / "own" / "per_class_ss.json").read_text())
    assert per_class["name"] == list(CLASSES)
    deviations = {d["key"]: d for d in record["recipe_diff"]["deviations"]}
    assert deviations["training.dataset"]["ours"] == "toppings (3 classes, own data)"
    report = (root / "artifacts" / "reports" / "report.md").read_text()
    assert "| no published row | no published row | own data (toppings): no published row |" in report

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("micro")
    (training,) = client.search_runs([experiment.experiment_id], "tags.`vitadapter.kind` = 'train'")
    assert training.data.tags["vitadapter.published"] == "no published row"
    assert training.data.tags["dataset"] == "toppings"
    assert "published_ss_mIoU" not in training.data.metrics and "ss_mIoU" in training.data.metrics
    assert "| SS mIoU |" in training.data.tags["mlflow.note.content"]
    assert "no published row |" in training.data.tags["mlflow.note.content"]
    (version,) = client.search_model_versions(f"name='{ENTRY}-toppings'")
    assert version.tags["dataset"] == "toppings"

    again = _run([str(BIN / "dvc"), "repro"], root, env)
    assert "Running stage" not in again.stdout
    # an edited card makes its shards stale (and through them the training)
    card["classes"] = ["background", "ham", "black olive"]
    (root / "toppings.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
    status = _run([str(BIN / "dvc"), "status"], root, env)
    assert "prepare_toppings" in status.stdout and "toppings.yaml" in status.stdout
