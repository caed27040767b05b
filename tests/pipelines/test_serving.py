"""The MLflow model a training run logs: registered under its zoo entry, served by the real
``mlflow models serve --env-manager local`` on loopback, answering like ``vitadapter predict``."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from micro_params import micro_params, write_params
from pipelines.cli import main
from pipelines.config.params import Params, load_params
from pipelines.orchestration import stages
from pipelines.reporting.mlflow_model import decode_images, encode_image

SERVE_START_S = 180  # a cold start (torch, the model) on a loaded 2-core machine; usually ~20 s


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Params, dict]]:
    """The micro pipeline's tiny run, trained for 2 iterations with a sqlite tracking store."""
    root = tmp_path_factory.mktemp("serving")
    params = micro_params()
    params["paths"] = {key: str(root / value) for key, value in params["paths"].items()}
    params["tracking"] = {**params["tracking"], "uri": f"sqlite:///{root / 'mlflow.db'}"}
    params["runs"]["tiny"]["train"].update(max_iters=2, eval_interval=2, checkpoint_interval=2)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)  # the sqlite store's default artifact root is ./mlruns
        path = write_params(root / "params.yaml", params)
        loaded = load_params(path)
        stages.prepare_stage(loaded, "ade20k")
        summary = stages.train_stage(loaded, "tiny", params_file=path)
        yield loaded, summary


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def test_training_registers_the_model_under_its_zoo_entry(trained: tuple[Params, dict]) -> None:
    params, summary = trained
    client = MlflowClient(params.tracking.uri)
    entry = params.runs["tiny"].config
    (version,) = client.search_model_versions(f"name='{entry}'")
    train_run = client.get_run(version.run_id)
    assert train_run.data.tags["vitadapter.run"] == "tiny" and version.tags["zoo_entry"] == entry
    logged = {item.path for item in client.list_artifacts(version.run_id, "model")}
    assert {"model/MLmodel", "model/input_example.json", "model/artifacts"} <= logged
    local = Path(client.download_artifacts(version.run_id, "model/MLmodel"))
    import yaml

    mlmodel = yaml.safe_load(local.read_text())
    metadata = mlmodel["metadata"]
    assert metadata["zoo_entry"] == entry and metadata["overrides"]["backbone.trunk.embed_dim"] == 64
    assert len(metadata["class_names"]) == len(metadata["palette"]) == 150
    assert "signature" not in mlmodel  # arrays of any size, batches and base64 strings: no one schema
    assert Path(summary["best_checkpoint"] or summary["last_checkpoint"]).is_file()


def test_decode_images_accepts_arrays_batches_and_base64() -> None:
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[..., 0] = 200  # red
    images, single = decode_images(rgb)
    assert single and images[0][0, 0].tolist() == [0, 0, 200]  # BGR inside, as cv2 reads files
    images, single = decode_images(np.stack([rgb, rgb]))
    assert not single and len(images) == 2
    png = encode_image(rgb[:, :, ::-1].copy())
    images, single = decode_images(pd.DataFrame({"image": [png, png]}))
    assert not single and np.array_equal(images[1], rgb[:, :, ::-1])
    images, single = decode_images(np.array([png]))
    assert not single and images[0].shape == (4, 6, 3)
    with pytest.raises(ValueError, match="base64-encoded PNG or JPEG"):
        decode_images(["not base64 !"])
    with pytest.raises(ValueError, match=r"expected an \(H, W, 3\) RGB image"):
        decode_images(np.zeros((2, 2)))


def test_served_model_answers_like_predict(trained: tuple[Params, dict], tmp_path: Path) -> None:
    params, summary = trained
    entry = params.runs["tiny"].config
    checkpoint = summary["best_checkpoint"] or summary["last_checkpoint"]
    rng = np.random.default_rng(1)
    image = cv2.GaussianBlur(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8), (0, 0), 2)
    cv2.imwrite(str(tmp_path / "photo.png"), image)
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                checkpoint,
                "--out",
                str(tmp_path / "pred"),
                str(tmp_path / "photo.png"),
            ]
        )
        == 0
    )
    expected = cv2.imread(str(tmp_path / "pred" / "photo.png"), cv2.IMREAD_UNCHANGED).astype(np.int64)

    port = _free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": params.tracking.uri,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # its uvicorn
    }
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{entry}/1"]
    command += ["--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log_file:
        server = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True
        )
    try:
        deadline = time.monotonic() + SERVE_START_S
        while True:
            assert server.poll() is None, f"the server exited: {log_path.read_text()[-3000:]}"
            with (
                contextlib.suppress(urllib.error.URLError, ConnectionError),
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as response,
            ):
                if response.status == 200:
                    break
            assert time.monotonic() < deadline, (
                f"no answer in {SERVE_START_S} s: {log_path.read_text()[-3000:]}"
            )
            time.sleep(1)
        url = f"http://127.0.0.1:{port}/invocations"
        rgb = image[:, :, ::-1]
        as_array = np.asarray(_post(url, {"inputs": rgb.tolist()})["predictions"])
        assert as_array.shape == expected.shape and np.array_equal(as_array, expected)
        as_png = _post(
            url, {"dataframe_split": {"columns": ["image"], "data": [[encode_image(tmp_path / "photo.png")]]}}
        )
        assert np.array_equal(np.asarray(as_png["predictions"])[0], expected)
        jpeg = base64.b64encode(cv2.imencode(".jpg", image)[1].tobytes()).decode()
        assert np.asarray(_post(url, {"inputs": [jpeg]})["predictions"]).shape == (1, *expected.shape)
    finally:
        with contextlib.suppress(ProcessLookupError):  # its own session: the CLI and its uvicorn worker
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
