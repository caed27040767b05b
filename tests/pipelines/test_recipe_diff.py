"""The recipe diff of a run: written by training, carried by checkpoints, printed by ``vitadapter run diff``,
folded into evaluations, logged to MLflow and read by the report's "comparable" column."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data.prepare import prepare_dataset
from data.provenance import dataset_source
from data.synthetic import synthesize
from micro_params import TINY_UPERNET_OVERRIDES, micro_params, write_params
from models.checkpoint import load_checkpoint_file
from models.zoo import resolved_overrides
from pipelines.cli import main
from pipelines.config.knobs import TrainParams
from pipelines.config.params import load_params
from pipelines.reporting.report import report_markdown, report_rows
from pipelines.runs.recipe_diff import Deviation, RecipeDiff, read_diff
from pipelines.runs.training import RunSpec, run_training

NAME = "upernet_deit_adapter_tiny_512_160k_ade20k"


@pytest.fixture(scope="module")
def twin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("twin")
    report = synthesize(
        "ade20k", root / "raw", num_train=4, num_val=2, min_size=64, max_size=80, num_classes_used=3
    )
    prepare_dataset("ade20k", report.root, root / "prepared")
    return root / "prepared"


def test_the_prepared_index_says_where_the_data_came_from(twin: Path) -> None:
    assert dataset_source(twin) == {"kind": "synthetic", "written_by": "vitadapter data synthesize"}
    assert dataset_source(twin.parent / "raw")["kind"] == "synthetic"
    assert dataset_source(twin.parent / "nowhere")["kind"] == "unknown"


def test_training_writes_and_checkpoints_carry_the_diff(twin: Path, tmp_path: Path, capsys) -> None:
    spec = RunSpec(
        name=NAME,
        data=twin,
        work_dir=tmp_path / "run",
        knobs=TrainParams(
            max_iters=1, batch_size=2, global_batch=2, pretrained="none", num_workers=0, eval_interval=100
        ),
        overrides=resolved_overrides(NAME, TINY_UPERNET_OVERRIDES, preset="tiny"),
        progress=False,
        preset="tiny",
    )
    run_training(spec)
    diff = read_diff(tmp_path / "run")
    assert diff is not None and diff.kind == "training" and not diff.comparable
    expected = ["iterations", "global_batch", "bn_group", "world_size", "crop", "pretrained", "dataset"]
    assert diff.keys == [*expected, "config", "preset"]
    config_change = diff.deviations[diff.keys.index("config")]
    assert config_change.ours["optimizer.lr"] == TINY_UPERNET_OVERRIDES["optimizer.lr"]
    assert diff.setup["plan"]["tf32"] is True and diff.setup["dataset"]["kind"] == "synthetic"
    checkpoint = load_checkpoint_file(tmp_path / "run" / "iter_0000001.pth")
    assert checkpoint["recipe_diff"] == diff.to_dict() and checkpoint["plan"]["tf32"] is True
    assert main(["run", "diff", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out
    assert "9 deviation(s)" in printed and "bn_group: published 16, ours 2" in printed
    assert main(["run", "diff", str(tmp_path / "run"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["comparable"] is False
    assert main(["run", "diff", str(tmp_path)]) == 1
    # an evaluation of the run's checkpoint folds the training's deviations into its own
    out = tmp_path / "eval.json"
    command = [
        "evaluate",
        "--no-tracking",
        NAME,
        "--checkpoint",
        str(tmp_path / "run" / "iter_0000001.pth"),
        "--data",
        str(twin),
    ]
    assert main([*command, "--out", str(out), "--no-progress", "--no-tf32"]) == 0
    summary = json.loads(out.read_text())
    assert summary["tf32"] is False and summary["comparable_to_published"] is False
    keys = [d["key"] for d in summary["recipe_diff"]["deviations"]]
    # DeiT-T: the reference's test.py ran it in fp16 autocast on GPUs, this CPU run in fp32
    assert keys == [f"training.{key}" for key in diff.keys] + [
        "eval_scales",
        "eval_precision",
        "tf32",
        "dataset",
    ]
    assert summary["recipe_deviations"] == len(keys)


def _deviating() -> RecipeDiff:
    return RecipeDiff(
        NAME,
        "evaluation",
        (Deviation("training.iterations", 160_000, 4), Deviation("dataset", "official", "x")),
    )


def test_the_report_column_comes_from_the_recorded_diff(tmp_path: Path) -> None:
    paths = {key: str(tmp_path / value) for key, value in micro_params()["paths"].items()}
    params = load_params(write_params(tmp_path / "params.yaml", micro_params(paths=paths)))
    record = Path(params.paths.reports) / "records" / "tiny" / "eval_ss.json"
    record.parent.mkdir(parents=True)
    diff = _deviating().to_dict()
    record.write_text(json.dumps({"mIoU": 12.5, "delta_miou": -30.1, "recipe_diff": diff}))
    rows = report_rows(params)
    assert rows[0]["comparable"] is False and rows[0]["deviations"] == ["training.iterations", "dataset"]
    assert "| not comparable: training.iterations, dataset |" in report_markdown(rows)
    record.write_text(
        json.dumps(
            {"mIoU": 42.0, "delta_miou": -0.6, "recipe_diff": RecipeDiff(NAME, "evaluation").to_dict()}
        )
    )
    assert "| comparable |" in report_markdown(report_rows(params))


def test_mlflow_gets_the_artifact_the_count_and_the_tag(tmp_path: Path) -> None:
    """On a real sqlite MLflow store: the recipe_diff.json artifact, the deviation count and the tag."""
    from mlflow import MlflowClient

    from pipelines.reporting.mlflow_store import MlflowStore, record_diff

    store = MlflowStore(f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_root=tmp_path / "artifacts")
    run_id = store.create_run("diff-test", "a run", {})
    record_diff(store, run_id, _deviating().to_dict())
    client = MlflowClient(store.uri)
    run = client.get_run(run_id)
    assert run.data.metrics["recipe_deviations"] == 2 and run.data.tags["comparable_to_published"] == "false"
    downloaded = client.download_artifacts(run_id, "recipe_diff.json", str(tmp_path))
    assert json.loads(Path(downloaded).read_text()) == json.loads(json.dumps(_deviating().to_dict()))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_skipped_steps_and_samples_are_deviations_once_they_happened(tmp_path: Path, precision: str) -> None:
    """fp16's loss-scaler skips belong to fp16 training (the precision deviation): counted, not a deviation."""
    import models
    from pipelines.engine.plan import resolve_plan
    from pipelines.runs.recipe_diff import training_diff

    config = models.get_config(NAME)
    plan = resolve_plan(config, TrainParams(precision=precision), world_size=8, work_dir=tmp_path)
    official = {"kind": "official"}
    pretrained = {"file": config.pretrained.file}

    def diff(health: dict | None) -> RecipeDiff:
        return training_diff(
            config, plan, pretrained=pretrained, init_from=None, dataset=official, health=health
        )

    assert diff(None).keys == diff({"skipped_steps": 0, "skipped_samples": 0}).keys
    counted = diff({"skipped_steps": 3, "skipped_samples": 2})
    expected = ["skipped_samples"] if precision == "fp16" else ["skipped_steps", "skipped_samples"]
    assert [d.key for d in counted.deviations if d.key.startswith("skipped")] == expected
    assert counted.setup["health"] == {"skipped_steps": 3, "skipped_samples": 2}
