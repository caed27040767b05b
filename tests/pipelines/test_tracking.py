"""MLflow tracking against real stores: sqlite files, a real ``mlflow server`` on loopback, a dead port.

A fresh MLflow sqlite database costs seconds of schema migrations, so one database is created per
module and copied for each test. The server starts when the module does (in the background) so its
start-up overlaps the sqlite tests; its two tests come last (the very last one stops it mid-run) and
wait for ``/health``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imsave
from mlflow import MlflowClient
from mlflow.entities import Run

import models
from pipelines.config.knobs import TrainParams
from pipelines.config.params import RunParams, Tracking
from pipelines.reporting.records import (
    CLIPPED,
    FALLBACK_DB,
    MAX_PARAM_VALUE,
    PARENT_TAG,
    TrainingCallback,
    flatten_params,
    reference_rows,
)
from pipelines.reporting.tracking import Tracker

NAME = "upernet_deit_adapter_tiny_512_160k_ade20k"
EXPERIMENT, REFERENCE = "vitadapter-test", "vitadapter-test-reference"
SERVER_START_S = 180  # a cold start on a loaded 2-core machine; usually well under a minute


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_server(root: Path, port: int, log_file) -> subprocess.Popen:
    """``mlflow server`` on loopback over the store in ``root`` (its own process session)."""
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    command = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
        "--artifacts-destination", str(root / "artifacts"), "--workers", "1",
    ]  # fmt: skip
    process = subprocess.Popen(
        command, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    process.root = root  # type: ignore[attr-defined]  # for the test that restarts the server
    return process


@pytest.fixture(scope="module", autouse=True)
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, subprocess.Popen]]:
    """A real ``mlflow server`` (sqlite backend, artifacts in tmp), started before the module's tests."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    log_file = (root / "server.log").open("w")
    process = _start_server(root, port, log_file)
    yield f"http://127.0.0.1:{port}", process
    with contextlib.suppress(ProcessLookupError):  # its own session: the server and its workers
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    log_file.close()


@pytest.fixture(autouse=True)
def _restore_mlflow_environment() -> Iterator[None]:
    """A Tracker sets MLflow's HTTP bounds process-wide: undo that after each test."""
    saved = {
        name: os.environ.get(name)
        for name in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    }
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="module")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()  # creates the schema
    return path


@pytest.fixture()
def settings(tmp_path: Path, template_db: Path, monkeypatch: pytest.MonkeyPatch) -> Tracking:
    monkeypatch.chdir(tmp_path)  # the sqlite store's default artifact root is ./mlruns
    shutil.copy(template_db, tmp_path / "mlflow.db")
    return Tracking(
        uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        experiment=EXPERIMENT,
        reference_experiment=REFERENCE,
        timeout_s=2,
        max_retries=0,
    )


def _runs(client: MlflowClient, experiment: str, **tags: str) -> list[Run]:
    found = client.get_experiment_by_name(experiment)
    query = " AND ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
    return [] if found is None else list(client.search_runs([found.experiment_id], query))


def _artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    return {item.path for item in client.list_artifacts(run_id, path)}


def _run_dir(tmp_path: Path, name: str, iterations: int = 4) -> Path:
    run_dir = tmp_path / "runs" / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(models.get_config(NAME).to_dict()))
    (run_dir / "key_report.json").write_text(json.dumps({"config": NAME, "missing": []}))
    lines = [
        {"iteration": i, "loss": 2.0 / i, "decode.loss_ce": 1.5 / i, "lr": 1e-4}
        for i in range(1, iterations + 1)
    ]
    (run_dir / "train_log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run_dir


def _train(
    tracker: Tracker,
    name: str,
    *,
    parent: str | None = None,
    steps: tuple[int, ...] = (2, 4),
    end: bool = True,
) -> None:
    tracker.start_training_run(
        run_name=name,
        config=models.get_config(NAME),
        run_params=RunParams(config=NAME, train=TrainParams(max_iters=4)),
        tags={
            "vitadapter.run": name,
            "vitadapter.dvc_stage": f"train@{name}",
            "mlflow.source.git.commit": "c0ffee",
        },
        parent=parent,
    )
    callback = TrainingCallback(tracker)
    for step in steps:
        callback.on_log(step, {"loss": 1.0 / step, "decode.loss_ce": 0.5 / step, "lr": 1e-4 * step, "images_per_s": 3.5, "peak_memory_mb": 0.0})  # fmt: skip
    callback.on_eval(steps[-1], {"mIoU": 12.5, "aAcc": 60.0, "mAcc": 20.0, "per_class": {"name": ["a"]}})
    callback.on_checkpoint(steps[-1], Path(f"runs/{name}/iter_{steps[-1]}.pth"), best=False)
    callback.on_checkpoint(steps[-1], Path(f"runs/{name}/best_mIoU.pth"), best=True)
    if end:
        tracker.end_run()


def _evaluate(tracker: Tracker, name: str, tmp_path: Path, mode: str = "ss") -> None:
    overlays = []
    for i in range(2):
        overlays.append(tmp_path / f"overlay_{mode}_{i}.png")
        imsave(overlays[-1], np.full((8, 8, 3), 40 * i, dtype=np.uint8))
    tracker.log_evaluation(
        run_name=name,
        mode=mode,
        metrics={"run": name, "config": NAME, "mode": mode, "checkpoint": "best_mIoU.pth", "published_miou": 42.6,
                 "delta_miou": 12.5 - 42.6, "mIoU": 12.5, "aAcc": 60.0, "mAcc": 20.0, "num_images": 2},
        per_class={"name": ["wall", "floor"], "IoU": [25.0, None], "Acc": [40.0, None]},
        artifacts=overlays,
        tags={"vitadapter.run": name, "vitadapter.dvc_stage": f"evaluate@{name}-{mode}"},
    )  # fmt: skip


def test_training_run_round_trip(settings: Tracking, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    tracker = Tracker(settings, fallback_dir=tmp_path / "fallback")
    _train(tracker, "tiny", end=False)
    time.sleep(1.0)  # a few system-metric samples
    tracker.end_run()
    tracker.log_run_files(_run_dir(tmp_path, "tiny"))

    client = MlflowClient(settings.uri)
    [run] = _runs(client, EXPERIMENT, **{"vitadapter.run": "tiny", "vitadapter.kind": "train"})
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    config = models.get_config(NAME)
    params = run.data.params
    assert params["backbone.trunk.embed_dim"] == str(config.backbone.trunk.embed_dim)
    assert params["data.train.crop_size"] == "[512, 512]"
    assert params["run.train.max_iters"] == "4" and params["run.config"] == NAME
    run_params = asdict(RunParams(config=NAME, train=TrainParams(max_iters=4)))
    # what ran, not the recipe beside it: the run's 4 iterations on one process
    effective = {"schedule.max_iters": "4", "data.train.gpus": "1"}
    expected = {**flatten_params(config.to_dict()), **flatten_params(run_params, "run"), **effective}
    # the backend asked for, beside the param deform_attn_backend the stage logs when it knows what ran
    expected["deform_attn_backend_requested"] = expected.pop("deform_attn_backend")
    assert params == expected
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(2, 0.5), (4, 0.25)]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/lr")] == [2, 4]
    metrics = run.data.metrics
    assert metrics["weighted_loss_terms/decode.loss_ce"] == 0.125 and metrics["images_per_s"] == 3.5
    assert "train/decode.loss_ce" not in metrics  # per-term losses under one prefix, after the headline
    assert metrics["val/mIoU"] == 12.5 and metrics["val/aAcc"] == 60.0 and metrics["val/mAcc"] == 20.0
    assert client.get_metric_history(run.info.run_id, "val/mIoU")[0].step == 4
    assert metrics["published_ss_mIoU"] == 42.6 and metrics["published_params_M"] == 36
    assert any(key.startswith("system/cpu") for key in metrics), sorted(metrics)
    tags = run.data.tags
    assert tags["mlflow.source.git.commit"] == "c0ffee" and tags["vitadapter.dvc_stage"] == "train@tiny"
    assert tags["vitadapter.zoo_entry"] == NAME
    assert tags["vitadapter.best_checkpoint"].endswith("best_mIoU.pth")
    assert tags["vitadapter.last_checkpoint"].endswith("iter_4.pth")
    assert tags["vitadapter.last_checkpoint_iteration"] == "4"
    assert {"config.json", "key_report.json", "train_log.jsonl", "training_curve.png"} <= _artifacts(
        client, run.info.run_id
    )
    curve = Path(client.download_artifacts(run.info.run_id, "training_curve.png", str(tmp_path)))
    assert curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "fallback").exists()


def test_long_param_values_are_clipped(settings: Tracking, tmp_path: Path) -> None:
    flat = flatten_params({"a": {"b": "x" * 10_000, "c": (1, 2)}, "empty": {}, "none": None})
    assert flat["a.c"] == "[1, 2]" and flat["empty"] == "{}" and flat["none"] == "null"
    assert len(flat["a.b"]) == MAX_PARAM_VALUE and flat["a.b"].endswith(CLIPPED)
    config = models.get_config(NAME, notes=("n" * 7000,))
    tracker = Tracker(settings, fallback_dir=tmp_path / "fallback")
    tracker.start_training_run(
        run_name="long", config=config, run_params=RunParams(config=NAME), tags={}, parent=None
    )
    tracker.end_run()
    [run] = _runs(MlflowClient(settings.uri), EXPERIMENT, **{"vitadapter.run": "long"})
    assert run.data.params["notes"].endswith(CLIPPED) and run.data.params["backbone.trunk.depth"] == "12"


def test_chain_children_share_one_parent(settings: Tracking, tmp_path: Path) -> None:
    for name in ("coco_stage", "ade_stage"):
        _train(Tracker(settings, fallback_dir=tmp_path), name, parent="coco_stage")
    client = MlflowClient(settings.uri)
    [chain] = _runs(client, EXPERIMENT, **{"vitadapter.kind": "chain"})
    assert chain.data.tags["vitadapter.chain"] == "coco_stage"
    children = _runs(client, EXPERIMENT, **{PARENT_TAG: chain.info.run_id})
    assert sorted(run.data.tags["vitadapter.run"] for run in children) == ["ade_stage", "coco_stage"]
    assert all(run.data.tags["vitadapter.chain"] == "coco_stage" for run in children)


def test_unfinished_run_is_resumed(settings: Tracking, tmp_path: Path) -> None:
    crashed = Tracker(settings, fallback_dir=tmp_path)
    _train(crashed, "resumable", steps=(1, 2), end=False)  # the process dies: the run stays RUNNING
    first = crashed.run_id
    resumed = Tracker(settings, fallback_dir=tmp_path)
    _train(resumed, "resumable", steps=(3, 4))
    assert resumed.run_id is None and first is not None
    client = MlflowClient(settings.uri)
    [run] = _runs(client, EXPERIMENT, **{"vitadapter.run": "resumable"})
    assert run.info.run_id == first and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(first, "train/loss")] == [1, 2, 3, 4]

    failing = Tracker(settings, fallback_dir=tmp_path)
    with pytest.raises(RuntimeError):
        try:
            _train(failing, "failing", end=False)
            raise RuntimeError("training failed")
        finally:
            failing.end_run()
    [failed] = _runs(client, EXPERIMENT, **{"vitadapter.run": "failing"})
    assert failed.info.status == "FAILED"
    _train(Tracker(settings, fallback_dir=tmp_path), "failing", steps=(5,))  # a failed run is resumed too
    assert [run.info.run_id for run in _runs(client, EXPERIMENT, **{"vitadapter.run": "failing"})] == [
        failed.info.run_id
    ]
    _train(Tracker(settings, fallback_dir=tmp_path), "failing", steps=(1,))  # a finished run is not
    assert len(_runs(client, EXPERIMENT, **{"vitadapter.run": "failing"})) == 2
    try:
        raise KeyError("handled elsewhere")
    except KeyError:  # ending a run while an unrelated exception is being handled
        _train(Tracker(settings, fallback_dir=tmp_path), "in_handler")
    [handled] = _runs(client, EXPERIMENT, **{"vitadapter.run": "in_handler"})
    assert handled.info.status == "FINISHED"


def test_evaluation_run_is_a_child_with_delta_table_and_overlays(settings: Tracking, tmp_path: Path) -> None:
    tracker = Tracker(settings, fallback_dir=tmp_path)
    _train(tracker, "evaluated")
    _evaluate(Tracker(settings, fallback_dir=tmp_path), "evaluated", tmp_path)
    _evaluate(Tracker(settings, fallback_dir=tmp_path), "never_trained", tmp_path, mode="ms")
    client = MlflowClient(settings.uri)
    [train] = _runs(client, EXPERIMENT, **{"vitadapter.run": "evaluated", "vitadapter.kind": "train"})
    [evaluation] = _runs(
        client, EXPERIMENT, **{"vitadapter.run": "evaluated", "vitadapter.kind": "evaluation"}
    )
    assert evaluation.data.tags[PARENT_TAG] == train.info.run_id
    assert evaluation.data.tags["vitadapter.eval_mode"] == "ss" and evaluation.info.status == "FINISHED"
    metrics = evaluation.data.metrics
    assert metrics["mIoU"] == 12.5 and metrics["aAcc"] == 60.0 and metrics["mAcc"] == 20.0
    assert metrics["published_mIoU"] == 42.6 and metrics["delta_mIoU"] == pytest.approx(12.5 - 42.6)
    assert metrics["ss_mIoU"] == 12.5 and evaluation.data.params["checkpoint"] == "best_mIoU.pth"
    assert train.data.metrics["ss_mIoU"] == 12.5
    assert train.data.metrics["ss_delta_mIoU"] == pytest.approx(12.5 - 42.6)
    assert _artifacts(client, evaluation.info.run_id, "overlays_ss") == {
        "overlays_ss/overlay_ss_0.png",
        "overlays_ss/overlay_ss_1.png",
    }
    table = json.loads(
        Path(
            client.download_artifacts(evaluation.info.run_id, "per_class_ss.json", str(tmp_path))
        ).read_text()
    )
    assert table["columns"] == ["name", "IoU", "Acc"] and table["data"][0] == ["wall", 25.0, 40.0]
    [alone] = _runs(client, EXPERIMENT, **{"vitadapter.run": "never_trained"})
    assert PARENT_TAG not in alone.data.tags and alone.data.metrics["ms_mIoU"] == 12.5


def test_reference_experiment_holds_each_published_row_once(settings: Tracking, tmp_path: Path) -> None:
    tracker = Tracker(settings, fallback_dir=tmp_path)
    tracker.sync_reference_experiment()
    tracker.sync_reference_experiment()
    runs = _runs(MlflowClient(settings.uri), REFERENCE)
    expected = [n for n in models.list_configs() if models.get_config(n).published.in_seed_table]
    expected += ["mask2former_beit_adapter_large_896_80k_cocostuff164k", "mask2former_beitv2_adapter_large_896_80k_cocostuff164k"]  # fmt: skip
    assert sorted(run.info.run_name for run in runs) == sorted(expected) and len(expected) == 16
    assert set(reference_rows()) == set(expected)
    for run in runs:
        published = models.get_config(run.info.run_name).published
        metrics, tags = run.data.metrics, run.data.tags
        assert metrics["params_M"] == published.params_m
        assert metrics.get("ss_mIoU") == published.miou_ss and metrics.get("ms_mIoU") == published.miou_ms
        assert {"dataset", "head", "crop", "schedule"} <= set(tags)
        assert tags["row"] == ("seed_table" if published.in_seed_table else "stage")
        assert len(MlflowClient(settings.uri).get_metric_history(run.info.run_id, "params_M")) == 1
    tiny = next(run for run in runs if run.info.run_name == NAME)
    assert (tiny.data.tags["crop"], tiny.data.tags["schedule"], tiny.data.tags["head"]) == (
        "512x512",
        "160k",
        "upernet",
    )
    assert tiny.data.params["reference_num_params"] == "36062428"


def test_report_run(settings: Tracking, tmp_path: Path) -> None:
    report = tmp_path / "report.md"
    report.write_text("# report\n")
    rows = [
        {"run": "a", "mode": "ss", "miou": 40.0, "published_miou": 42.6},
        {"run": "b", "mode": "ms", "miou": None},
    ]
    Tracker(settings, fallback_dir=tmp_path).log_report(report, rows)
    client = MlflowClient(settings.uri)
    [run] = _runs(client, EXPERIMENT, **{"vitadapter.kind": "report"})
    assert {"report.md", "report_rows.json"} <= _artifacts(client, run.info.run_id)
    assert run.data.metrics == {"rows": 2.0, "evaluated_rows": 1.0}


def test_disabled_tracker_is_a_no_op(tmp_path: Path) -> None:
    settings = Tracking(uri=f"sqlite:///{tmp_path / 'never.db'}", enabled=False)
    tracker = Tracker(settings, fallback_dir=tmp_path / "fallback")
    _train(tracker, "off")
    tracker.log_run_files(tmp_path)
    _evaluate(tracker, "off", tmp_path)
    tracker.sync_reference_experiment()
    tracker.log_report(tmp_path / "report.md", [])
    assert not (tmp_path / "never.db").exists() and not (tmp_path / "fallback").exists()


def test_dead_server_falls_back_to_a_local_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    settings = Tracking(
        uri=uri, experiment=EXPERIMENT, reference_experiment=REFERENCE, timeout_s=3, max_retries=1
    )
    fallback = tmp_path / "fallback"
    caplog.set_level(logging.WARNING, logger="pipelines.reporting.tracking")
    start = time.perf_counter()
    tracker = Tracker(settings, fallback_dir=fallback)
    _train(tracker, "offline")
    tracker.log_run_files(_run_dir(tmp_path, "offline"))
    later = Tracker(settings, fallback_dir=fallback)  # a later stage of the same process
    _evaluate(later, "offline", tmp_path)
    later.sync_reference_experiment()
    elapsed = time.perf_counter() - start
    assert elapsed < 20, f"tracking against a dead server took {elapsed:.1f} s"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(uri in message and FALLBACK_DB in message for message in warnings), warnings
    assert tracker.uri == later.uri == f"sqlite:///{(fallback / FALLBACK_DB).resolve()}"

    client = MlflowClient(tracker.uri)
    [train] = _runs(client, EXPERIMENT, **{"vitadapter.run": "offline", "vitadapter.kind": "train"})
    assert [m.step for m in client.get_metric_history(train.info.run_id, "train/loss")] == [2, 4]
    assert "training_curve.png" in _artifacts(client, train.info.run_id)
    assert str(fallback.resolve()) in client.get_experiment(train.info.experiment_id).artifact_location
    [evaluation] = _runs(client, EXPERIMENT, **{"vitadapter.kind": "evaluation"})
    assert evaluation.data.tags[PARENT_TAG] == train.info.run_id
    assert len(_runs(client, REFERENCE)) == 16

    with socket.socket() as hung:  # accepts connections (the kernel's backlog), never answers
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)
        hung_uri = f"http://127.0.0.1:{hung.getsockname()[1]}"
        settings = Tracking(uri=hung_uri, experiment=EXPERIMENT, timeout_s=1, max_retries=0)
        report = tmp_path / "report.md"
        report.write_text("# report\n")
        start = time.perf_counter()
        Tracker(settings, fallback_dir=fallback).log_report(report, [])
        assert time.perf_counter() - start < 10  # one timed-out request, then the local store
    assert any(hung_uri in record.getMessage() for record in caplog.records)
    assert len(_runs(client, EXPERIMENT, **{"vitadapter.kind": "report"})) == 1


def _wait_healthy(uri: str, process: subprocess.Popen) -> str:
    started = time.monotonic()
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        assert process.poll() is None, "mlflow server exited"
        assert time.monotonic() - started < SERVER_START_S, (
            f"mlflow server not healthy after {SERVER_START_S} s"
        )
        time.sleep(0.25)
    logging.getLogger(__name__).info("mlflow server healthy %.1f s into the test", time.monotonic() - started)
    return uri


def test_mlflow_server_round_trip(mlflow_server: tuple[str, subprocess.Popen], tmp_path: Path) -> None:
    uri = _wait_healthy(*mlflow_server)
    settings = Tracking(
        uri=uri, experiment=EXPERIMENT, reference_experiment=REFERENCE, timeout_s=10, max_retries=1
    )
    tracker = Tracker(settings, fallback_dir=tmp_path / "fallback")
    _train(tracker, "served", parent="served")
    tracker.log_run_files(_run_dir(tmp_path, "served"))
    _evaluate(tracker, "served", tmp_path)
    tracker.sync_reference_experiment()
    assert tracker.uri == uri and not (tmp_path / "fallback").exists()

    client = MlflowClient(uri)
    [train] = _runs(client, EXPERIMENT, **{"vitadapter.run": "served", "vitadapter.kind": "train"})
    [chain] = _runs(client, EXPERIMENT, **{"vitadapter.kind": "chain"})
    assert train.data.tags[PARENT_TAG] == chain.info.run_id
    assert train.data.params["backbone.trunk.embed_dim"] == "192"
    assert [(m.step, m.value) for m in client.get_metric_history(train.info.run_id, "train/loss")] == [
        (2, 0.5),
        (4, 0.25),
    ]
    assert train.data.metrics["ss_delta_mIoU"] == pytest.approx(12.5 - 42.6)
    assert {"config.json", "train_log.jsonl", "training_curve.png"} <= _artifacts(client, train.info.run_id)
    [evaluation] = _runs(client, EXPERIMENT, **{"vitadapter.kind": "evaluation"})
    assert evaluation.data.metrics["delta_mIoU"] == pytest.approx(12.5 - 42.6)
    assert "per_class_ss.json" in _artifacts(client, evaluation.info.run_id)
    overlay = client.download_artifacts(evaluation.info.run_id, "overlays_ss/overlay_ss_0.png", str(tmp_path))
    assert Path(overlay).read_bytes()[:4] == b"\x89PNG"
    assert {run.info.run_name for run in _runs(client, REFERENCE)} == set(reference_rows())


def test_server_dying_mid_run_continues_in_the_fallback_store(
    mlflow_server: tuple[str, subprocess.Popen], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    uri, process = _wait_healthy(*mlflow_server), mlflow_server[1]
    settings = Tracking(
        uri=uri, experiment=EXPERIMENT, reference_experiment=REFERENCE, timeout_s=5, max_retries=1
    )
    tracker = Tracker(settings, fallback_dir=tmp_path / "fallback")
    _train(tracker, "interrupted", steps=(1,), end=False)
    os.killpg(process.pid, signal.SIGTERM)  # the server goes away mid-run (the module's last test)
    process.wait(timeout=30)
    start = time.perf_counter()
    callback = TrainingCallback(tracker)
    for step in (2, 3):  # the trainer goes on
        callback.on_log(step, {"loss": 1.0 / step, "lr": 1e-4})
    callback.on_eval(3, {"mIoU": 5.0, "aAcc": 50.0, "mAcc": 10.0})
    tracker.end_run()
    tracker.log_run_files(_run_dir(tmp_path, "interrupted"))
    assert time.perf_counter() - start < 20
    assert tracker.uri.endswith(FALLBACK_DB)
    assert any(uri in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    client = MlflowClient(tracker.uri)
    [run] = _runs(client, EXPERIMENT, **{"vitadapter.run": "interrupted", "vitadapter.kind": "train"})
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [2, 3]
    assert run.data.metrics["val/mIoU"] == 5.0 and run.data.params["run.train.max_iters"] == "4"
    assert run.data.tags["vitadapter.dvc_stage"] == "train@interrupted"
    assert run.info.status == "FINISHED" and "training_curve.png" in _artifacts(client, run.info.run_id)
    server_run = run.data.tags["vitadapter.failed_over_from"].rpartition("#")[2]
    assert any(
        server_run in r.getMessage() and "vitadapter tracking sync" in r.getMessage() for r in caplog.records
    )

    # the server comes back: `vitadapter tracking sync` copies the fallback records and marks the server's copy
    port = _free_port()
    with (process.root / "server2.log").open("w") as log_file:
        restarted = _start_server(process.root, port, log_file)
        try:
            server = _wait_healthy(f"http://127.0.0.1:{port}", restarted)
            from pipelines.cli import main

            sync = ["tracking", "sync", "--from", tracker.uri, "--to", server]
            assert main(sync) == 0
            on_server = MlflowClient(server)
            assert on_server.get_run(server_run).info.status == "FAILED"
            copied_id = on_server.get_run(server_run).data.tags["vitadapter.failed_over_to"]
            copied = on_server.get_run(copied_id)
            assert [m.step for m in on_server.get_metric_history(copied_id, "train/loss")] == [2, 3]
            assert copied.data.params["run.train.max_iters"] == "4" and copied.info.status == "FINISHED"
            assert "training_curve.png" in _artifacts(on_server, copied_id)
            before = len(on_server.search_runs([on_server.get_experiment_by_name(EXPERIMENT).experiment_id]))
            assert main(sync) == 0  # idempotent
            after = len(on_server.search_runs([on_server.get_experiment_by_name(EXPERIMENT).experiment_id]))
            assert after == before
        finally:
            os.killpg(restarted.pid, signal.SIGTERM)
            restarted.wait(timeout=30)
