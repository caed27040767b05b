"""Corrupt data found late, with real shards damaged after preparation: a shard truncated under a running
`vitadapter train` (loader workers) stops it with one line naming the shard and the sample, the checkpoints
are kept and the same command resumes once the shards are rebuilt; with ``--skip-corrupt`` corrupt training and
validation samples are skipped, counted and recorded in the run folder and MLflow."""

from __future__ import annotations

import json
import tarfile
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

import models
from data.prepare import prepare_dataset
from data.synthetic import synthesize
from micro_params import cli_model_args, tiny_model
from models.checkpoint import load_checkpoint_file
from pipelines.cli import main
from pipelines.config.knobs import TrainParams
from pipelines.engine.checkpoints import save_checkpoint_file
from pipelines.orchestration.tracked import command_tracker, train_command_tracked
from pipelines.runs.folder import RunFolder
from pipelines.runs.training import RunSpec

NAME = "upernet_deit_adapter_tiny_512_160k_ade20k"
TWIN = {"num_train": 8, "num_val": 2, "seed": 7, "min_size": 64, "max_size": 96, "num_classes_used": 4}


def _prepare(root: Path) -> tuple[Path, Path]:
    """The raw twin and its shards (train: 2 shards of 4 samples)."""
    raw = synthesize("ade20k", root / "raw", **TWIN).root
    prepare_dataset("ade20k", raw, root / "shards", samples_per_shard=4)
    return raw, root / "shards"


def _spoil_image(shard: Path, number: int) -> str:
    """Zero the image bytes of sample ``number`` of ``shard`` in place (its size unchanged); its key."""
    with tarfile.open(shard) as tar:
        member = [m for m in tar.getmembers() if m.name.endswith(".jpg")][number]
    with shard.open("r+b") as handle:
        handle.seek(member.offset_data)
        handle.write(bytes(member.size))
    return member.name.partition(".")[0]


def test_a_shard_truncated_during_training_stops_it_naming_shard_and_key_and_it_resumes_after_rebuild(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    raw, shards = _prepare(tmp_path)
    work = tmp_path / "run"
    shard = shards / "train-000001.tar"
    with tarfile.open(shard) as tar:
        keys = {m.name.partition(".")[0] for m in tar.getmembers()}

    def lose_the_shard() -> None:
        """The disk loses most of the shard under the running training (its loader workers hold it open)."""
        deadline = time.monotonic() + 600
        while not (work / "iter_0000002.pth").exists():
            if time.monotonic() > deadline:
                return
            time.sleep(0.02)
        with shard.open("r+b") as handle:
            handle.truncate(1024)

    command = ["train", "--no-tracking", NAME, "--data", str(shards), "--work-dir", str(work)]
    command += ["--max-iters", "12", "--batch-size", "2", "--global-batch", "2", "--checkpoint-interval", "2"]
    command += [
        "--eval-interval",
        "1000",
        "--log-interval",
        "1",
        "--pretrained",
        "none",
        "--num-workers",
        "2",
    ]
    command += ["--no-progress", *cli_model_args()]
    fault = threading.Thread(target=lose_the_shard, daemon=True)
    fault.start()
    assert main(command) == 1
    fault.join(timeout=1)
    assert not fault.is_alive(), "the run ended before its first checkpoint"
    error = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"][-1]
    failed = RunFolder(work).read_log()[-1]
    assert (
        failed == {"iteration": failed["iteration"], "failed": "data", "error": error} and "\n" not in error
    )
    assert error.startswith(f"iteration {failed['iteration']}: {shard}: ") and "cannot be read" in error
    assert any(f"sample {key!r}" in error or f"the last readable one is {key!r}" in error for key in keys)
    assert "Traceback" not in caplog.text and "DataLoader worker" not in caplog.text
    last = RunFolder(work).latest_checkpoint()
    assert f"the last good checkpoint is {last}" in error and "rebuild the shards" in error
    assert load_checkpoint_file(last)["iteration"] == int(last.stem.split("_")[1])

    prepare_dataset("ade20k", raw, shards, samples_per_shard=4)  # rebuilt: the same bytes as before
    caplog.clear()
    assert main(command) == 0  # the same command resumes from the last checkpoint
    assert f"resuming from {last}" in caplog.text
    assert [r["iteration"] for r in RunFolder(work).read_log()] == list(range(1, 13))  # the failure dropped
    assert load_checkpoint_file(work / "iter_0000012.pth")["iteration"] == 12


def test_skip_corrupt_skips_counts_and_records_in_the_run_folder_and_mlflow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    _, shards = _prepare(tmp_path)
    train_key = _spoil_image(shards / "train-000001.tar", 2)
    val_key = _spoil_image(shards / "val-000000.tar", 1)
    # without --skip-corrupt: a one-line error naming the shard and the sample, as in training
    checkpoint = save_checkpoint_file({"state_dict": tiny_model(NAME).state_dict()}, tmp_path / "model.pth")
    evaluate = ["evaluate", "--no-tracking", NAME, "--checkpoint", str(checkpoint), "--data", str(shards)]
    evaluate += ["--no-progress", "--out", str(tmp_path / "eval.json"), *cli_model_args()]
    assert main(evaluate) == 1
    assert f"{shards / 'val-000000.tar'}: sample {val_key!r} cannot be read: image: " in caplog.text
    assert main([*evaluate, "--skip-corrupt"]) == 0
    record = json.loads((tmp_path / "eval.json").read_text())
    assert record["num_images"] == 1 and record["skipped_samples"] == 1
    assert [(s["shard"], s["key"]) for s in record["skipped"]] == [(str(shards / "val-000000.tar"), val_key)]

    uri = f"sqlite:///{tmp_path / 'store.db'}"
    work = tmp_path / "run"
    knobs = TrainParams(
        max_iters=4,
        batch_size=2,
        global_batch=2,
        log_interval=1,
        eval_interval=4,
        checkpoint_interval=4,
        num_workers=0,
        pretrained="none",
        skip_corrupt=True,
    )
    spec = RunSpec(
        name=NAME,
        data=shards,
        work_dir=work,
        knobs=knobs,
        overrides=models.zoo.resolved_overrides(NAME, preset="tiny"),
        progress=False,
        preset="tiny",
    )
    result = train_command_tracked(spec, command_tracker(uri, "corrupt", enabled=True))
    assert result.iterations == 4  # 4 steps of 2: one pass over the 8 samples, the spoiled one met once
    (skipped,) = RunFolder(work).read_records("skipped_samples.jsonl")
    assert (skipped["shard"], skipped["key"]) == (str(shards / "train-000001.tar"), train_key)
    assert skipped["iteration"] in range(1, 5) and skipped["replaced_by"] != train_key
    assert RunFolder(work).read_log()[-1]["skipped_samples"] == 1
    assert RunFolder(work).read_eval_log()[-1]["skipped_samples"] == 1  # the validation sample, left out
    diff = json.loads((work / "recipe_diff.json").read_text())
    assert [d["ours"] for d in diff["deviations"] if d["key"] == "skipped_samples"] == [1]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("corrupt").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["train/skipped_samples"] == 1 and run.data.metrics["val/skipped_samples"] == 1
    assert "skipped_samples.jsonl" in [a.path for a in client.list_artifacts(run.info.run_id)]
