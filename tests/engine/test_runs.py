"""Run plumbing: weight files (local, downloaded over a real loopback HTTP server, hashed), pretrained key
reports, the strategy-2 hand-off, precision options and distributed evaluation."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import models
from micro_params import ade_twin_shards, cli_model_args, tiny_config, tiny_model
from models.checkpoint import load_checkpoint_file
from pipelines.cli import main
from pipelines.config.knobs import TrainParams
from pipelines.engine.checkpoints import save_checkpoint_file
from pipelines.runs.training import RunSpec, build_model, run_training, stage_checkpoint_path
from pipelines.runs.weights import WeightsNotFoundError, resolve_weights

NAME = "upernet_deit_adapter_tiny_512_160k_ade20k"
TINY = models.zoo.resolved_overrides(NAME, preset="tiny")  # what a run records


@pytest.fixture(scope="module")
def twin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ade_twin_shards(
        tmp_path_factory.mktemp("twin"),
        num_train=8,
        num_val=5,
        seed=1,
        min_size=64,
        max_size=96,
        num_classes_used=4,
    )


@pytest.fixture
def http_folder(tmp_path: Path):
    """A real HTTP server on loopback serving ``tmp_path / 'served'``."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_weights_are_downloaded_and_hash_checked(http_folder, tmp_path: Path) -> None:
    served, base = http_folder
    payload = b"pretrained weights" * 1000
    digest = hashlib.sha256(payload).hexdigest()
    name = f"deit_fake_patch16_224-{digest[:8]}.pth"
    (served / name).write_bytes(payload)
    path, sha = resolve_weights(name, f"{base}/{name}", weights_dir=tmp_path / "weights")
    assert path == tmp_path / "weights" / name and path.read_bytes() == payload and sha == digest
    # present now: no second download needed (the server is not asked again)
    (served / name).unlink()
    assert resolve_weights(name, f"{base}/{name}", weights_dir=tmp_path / "weights")[1] == digest
    # a file whose content does not match the hash in its name is refused
    bad = f"deit_other-{'0' * 8}.pth"
    (served / bad).write_bytes(payload)
    with pytest.raises(ValueError, match="does not match the expected 00000000"):
        resolve_weights(bad, f"{base}/{bad}", weights_dir=tmp_path / "weights")
    with pytest.raises(ValueError, match="does not match the expected abc"):
        resolve_weights(name, None, weights_dir=tmp_path / "weights", sha256="abc")


def test_every_weight_file_is_verified_by_content(http_folder, tmp_path: Path) -> None:
    """BEiT/AugReg/release files carry no hash in their name: their sha256 is recorded on first use and checked
    afterwards; a download is verified before it is renamed into place."""
    served, base = http_folder
    weights = tmp_path / "weights"
    name = "beit_large_patch16_224_pt22k_ft22k.pth"
    payload = b"beit weights" * 1000
    (served / name).write_bytes(payload)
    path, digest = resolve_weights(name, f"{base}/{name}", weights_dir=weights)
    assert digest == hashlib.sha256(payload).hexdigest() and len(digest) == 64
    assert json.loads((weights / "SHA256SUMS.json").read_text()) == {name: digest}
    path.write_bytes(payload[:-1] + b"X")  # the file changes on disk
    with pytest.raises(ValueError, match=r"does not match the expected .*delete it to download it again"):
        resolve_weights(name, f"{base}/{name}", weights_dir=weights)
    path.unlink()
    (served / name).write_bytes(b"a different file under the same name")
    with pytest.raises(ValueError, match=r"the download's sha256 .* does not match"):
        resolve_weights(name, f"{base}/{name}", weights_dir=weights)
    assert not path.exists() and not any(weights.glob(".*.tmp"))  # nothing half-verified left in place


def test_offline_error_names_the_file_url_and_place(tmp_path: Path) -> None:
    url = "http://127.0.0.1:9/deit_tiny_patch16_224-a1311bcf.pth"  # nothing listens on the discard port
    with pytest.raises(WeightsNotFoundError) as err:
        resolve_weights("deit_tiny_patch16_224-a1311bcf.pth", url, weights_dir=tmp_path / "w")
    message = str(err.value)
    assert "deit_tiny_patch16_224-a1311bcf.pth is missing" in message and url in message
    assert str(tmp_path / "w" / "deit_tiny_patch16_224-a1311bcf.pth") in message
    with pytest.raises(WeightsNotFoundError, match="put it at"):
        resolve_weights("x.pth", url, weights_dir=tmp_path / "w", download=False)


def _spec(
    twin: Path, work_dir: Path, *, pretrained: str = "auto", precision: str = "fp32", **kwargs
) -> RunSpec:
    knobs = TrainParams(
        max_iters=2,
        batch_size=2,
        global_batch=2,
        log_interval=1,
        eval_interval=100,
        num_workers=0,
        pretrained=pretrained,
        precision=precision,
    )
    values = {
        "name": NAME,
        "data": twin,
        "work_dir": work_dir,
        "knobs": knobs,
        "overrides": TINY,
        "progress": False,
    }
    values.update(kwargs)
    return RunSpec(**values)


def test_pretrained_deit_file_is_loaded_and_reported(twin: Path, tmp_path: Path) -> None:
    torch.manual_seed(1)
    donor = tiny_model(NAME).backbone
    state = {
        k: v for k, v in donor.state_dict().items() if k.startswith(("patch_embed", "blocks", "pos_embed"))
    }
    state = {k: v for k, v in state.items() if not k.endswith(("gamma1", "gamma2"))}
    state["head.weight"] = torch.zeros(10, 64)
    pretrained = save_checkpoint_file({"model": state}, tmp_path / "deit.pth")
    run_training(_spec(twin, tmp_path / "run", pretrained=str(pretrained)))
    report = json.loads((tmp_path / "run" / "key_report.json").read_text())["pretrained"]
    assert report["file"] == str(pretrained) and len(report["sha256"]) == 64
    assert (
        len(report["loaded"]) == len(state) - 1 and report["unexpected"] == [] and report["mismatched"] == []
    )
    assert "blocks.0.gamma1" in report["missing"] and "spm.fc1.weight" in report["missing"]


def test_missing_pretrained_file_is_a_clear_error(twin: Path, tmp_path: Path) -> None:
    spec = _spec(twin, tmp_path / "run", pretrained="auto", weights_dir=tmp_path / "nothing_here")
    with pytest.raises(FileNotFoundError, match=r"deit_tiny_patch16_224-a1311bcf\.pth"):
        run_training(spec)


def test_stage_two_starts_from_stage_one_with_fresh_class_layers(twin: Path, tmp_path: Path) -> None:
    """The strategy-2 hand-off (docs/reference.md §R2.2), shown on UperNet: stage 1 with 171 classes, stage 2 with 150.

    Everything whose name and shape match is copied; both class layers get PyTorch's default initialisation;
    the stage-1 optimizer state and iteration are not carried.
    """
    torch.manual_seed(2)
    stage1 = tiny_model(NAME, num_classes=171)  # COCO-Stuff's classes (a model test: built unchecked)
    checkpoint = save_checkpoint_file(
        {"state_dict": stage1.state_dict(), "optimizer": {}, "iteration": 80000}, tmp_path / "s1.pth"
    )
    config = tiny_config(NAME)
    staged = dataclasses.replace(
        config, pretrained=dataclasses.replace(config.pretrained, init_from="stage1")
    )
    model, keys = build_model(_spec(twin, tmp_path / "run", init_from=str(checkpoint)), staged)
    assert "pretrained" not in keys  # the stage checkpoint replaces the pretrained trunk
    assert sorted(m["key"] for m in keys["init_from"]["mismatched"]) == [
        "auxiliary_head.conv_seg.bias",
        "auxiliary_head.conv_seg.weight",
        "decode_head.conv_seg.bias",
        "decode_head.conv_seg.weight",
    ]
    state = model.state_dict()
    for key, value in stage1.state_dict().items():
        if "conv_seg" not in key:
            assert torch.equal(state[key], value), key
    # PyTorch's default conv init (kaiming uniform, bound 1/sqrt(fan_in)), not the head's normal(0, 0.01)
    for head in ("decode_head", "auxiliary_head"):
        weight = state[f"{head}.conv_seg.weight"]
        assert weight.shape[0] == 150
        assert weight.abs().max() <= 1 / weight.shape[1] ** 0.5 and weight.std() > 0.05


def test_stage_two_without_its_stage_checkpoint_names_what_to_do(twin: Path, tmp_path: Path) -> None:
    config = models.get_config("mask2former_beit_adapter_large_896_80k_ade20k")
    spec = _spec(twin, tmp_path / "run", runs_dir=tmp_path / "runs", weights_dir=tmp_path / "weights")
    with pytest.raises(FileNotFoundError) as err:
        stage_checkpoint_path(config, spec)
    message = str(err.value)
    assert "mask2former_beit_adapter_large_896_80k_cocostuff164k" in message
    assert (
        "mask2former_beit_adapter_large_896_80k_cocostuff164k.zip" in message
        and "init_from='none'" in message
    )
    # the stage's run folder: its final (newest iteration) checkpoint, never the best-mIoU one (that one
    # depends on evaluation settings outside the training definition)
    stage = tmp_path / "runs" / "mask2former_beit_adapter_large_896_80k_cocostuff164k"
    stage.mkdir(parents=True)
    for name in ("best_mIoU.pth", "iter_0000008.pth", "iter_0000010.pth"):
        (stage / name).write_bytes(b"x")
    assert stage_checkpoint_path(config, spec) == stage / "iter_0000010.pth"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_training_runs(twin: Path, tmp_path: Path, precision: str) -> None:
    result = run_training(_spec(twin, tmp_path / "run", pretrained="none", precision=precision))
    state = load_checkpoint_file(result.last_checkpoint)
    assert state["iteration"] == 2 and state["plan"]["precision"] == precision
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
    if precision == "fp16":
        assert state["scaler"]["scale"] > 0


def test_distributed_evaluation_counts_each_image_once(twin: Path, tmp_path: Path) -> None:
    """Two processes under torchrun evaluate disjoint shares; ``--limit N`` is N images of the whole
    evaluation (the first N, split between the processes), not N per process."""
    torch.manual_seed(0)
    model = tiny_model(NAME)
    checkpoint = save_checkpoint_file({"state_dict": model.state_dict()}, tmp_path / "model.pth")
    sets = cli_model_args()
    args = [
        "evaluate",
        "--no-tracking",
        NAME,
        "--checkpoint",
        str(checkpoint),
        "--data",
        str(twin),
        "--no-progress",
        *sets,
    ]
    whole, single = tmp_path / "whole.json", tmp_path / "single.json"
    assert main([*args, "--out", str(whole)]) == 0
    assert main([*args, "--limit", "3", "--out", str(single)]) == 0
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        "29523",
    ]
    double = tmp_path / "double.json"
    run = subprocess.run(
        [*launcher, "-m", "pipelines.cli", *args, "--limit", "3", "--out", str(double)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    everything, one, two = (json.loads(f.read_text()) for f in (whole, single, double))
    assert everything["num_images"] == 5
    assert one["num_images"] == two["num_images"] == 3  # ranks 0 and 1 took 2 and 1 of the first 3
    for key in ("aAcc", "mIoU", "mAcc"):
        assert two[key] == pytest.approx(one[key], abs=1e-9)
