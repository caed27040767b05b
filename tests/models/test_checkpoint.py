"""Official checkpoints: strict loading with named keys, safe file reading, exact export."""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import models
from micro_params import TINY_MODEL
from models.checkpoint import (
    CheckpointError,
    export_official_state_dict,
    load_checkpoint_file,
    load_official_state_dict,
)
from pipelines.engine.checkpoints import save_checkpoint_file

TINY = TINY_MODEL
NAME = "upernet_deit_adapter_tiny_512_160k_ade20k"


@pytest.fixture
def model():
    torch.manual_seed(0)
    return models.create_segmentor(NAME, **TINY)


@pytest.fixture
def official(model):
    """An official-format checkpoint of the tiny model (mmseg container, numpy scalars in meta)."""
    state = {
        k: torch.randn_like(v) if v.is_floating_point() else v.clone() for k, v in model.state_dict().items()
    }
    meta = {"CLASSES": ("wall", "building"), "hook_msgs": {"best_score": np.float64(0.42)}, "iter": 160000}
    return {"meta": meta, "state_dict": state}


def test_strict_load_reports_every_key_by_name(model, official) -> None:
    state = dict(official["state_dict"])
    del state["backbone.level_embed"]
    state["backbone.cls_token"] = torch.zeros(1, 1, 64)
    state["decode_head.conv_seg.weight"] = torch.zeros(3, 32, 1, 1)
    with pytest.raises(CheckpointError) as err:
        load_official_state_dict(model, state)
    message = str(err.value)
    assert "missing (1) by prefix: backbone.level_embed (1); backbone.level_embed" in message
    assert "unexpected (1) by prefix: backbone.cls_token (1); backbone.cls_token" in message
    assert "decode_head.conv_seg.weight model [150, 32, 1, 1] vs checkpoint [3, 32, 1, 1]" in message


def test_a_long_key_report_is_summarised_per_prefix(model, official) -> None:
    state = {k: v for k, v in official["state_dict"].items() if not k.startswith("backbone.blocks.")}
    with pytest.raises(CheckpointError) as err:
        load_official_state_dict(model, state)
    line = next(x for x in str(err.value).splitlines() if x.startswith("missing"))
    assert line.startswith("missing (") and "backbone.blocks (" in line and "more)" in line
    assert len(line) < 1000  # not hundreds of key names: the full list goes to the key report


def test_non_strict_load_keeps_matching_keys(model, official) -> None:
    state = dict(official["state_dict"])
    state["decode_head.conv_seg.weight"] = torch.zeros(3, 32, 1, 1)
    before = model.decode_head.conv_seg.weight.clone()
    report = load_official_state_dict(model, state, strict=False)
    assert [k for k, _, _ in report.mismatched] == ["decode_head.conv_seg.weight"]
    torch.testing.assert_close(model.decode_head.conv_seg.weight, before)
    torch.testing.assert_close(model.backbone.level_embed, state["backbone.level_embed"])


def test_checkpoint_wrappers_and_module_prefix(model, official) -> None:
    wrapped = {"model": {f"module.{k}": v for k, v in official["state_dict"].items()}}
    report = load_official_state_dict(model, wrapped)
    assert report.complete
    torch.testing.assert_close(model.backbone.pos_embed, official["state_dict"]["backbone.pos_embed"])


def test_file_round_trip_with_mmcv_meta(tmp_path: Path, model, official) -> None:
    path = save_checkpoint_file(official, tmp_path / "official.pth")
    loaded = load_checkpoint_file(path)
    assert loaded["meta"]["hook_msgs"]["best_score"] == pytest.approx(0.42)
    load_official_state_dict(model, loaded)
    exported = export_official_state_dict(model)
    assert list(exported) == list(official["state_dict"])
    for key, value in official["state_dict"].items():
        assert torch.equal(exported[key], value), key


def test_release_zip_is_read_without_unpacking(tmp_path: Path, official) -> None:
    buffer = io.BytesIO()
    torch.save(official, buffer)
    archive = tmp_path / "mask2former_release.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("mask2former_release/model.pth.tar", buffer.getvalue())
    assert set(load_checkpoint_file(archive)["state_dict"]) == set(official["state_dict"])
    with zipfile.ZipFile(tmp_path / "two.zip", "w") as handle:
        handle.writestr("a.pth", b"x")
        handle.writestr("b.pth", b"y")
    with pytest.raises(CheckpointError, match="holds 2 checkpoint files"):
        load_checkpoint_file(tmp_path / "two.zip")


def test_truncated_foreign_and_missing_files(tmp_path: Path, official) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.pth does not exist"):
        load_checkpoint_file(tmp_path / "nope.pth")
    good = save_checkpoint_file(official, tmp_path / "good.pth")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: os.path.getsize(good) // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.pth is not a readable PyTorch checkpoint"):
        load_checkpoint_file(truncated)
    foreign = tmp_path / "notes.pth"
    foreign.write_text("this is a text file\n")
    with pytest.raises(CheckpointError, match=r"notes\.pth is not a readable PyTorch checkpoint"):
        load_checkpoint_file(foreign)


class _Payload:
    def __reduce__(self):
        return (os.getcwd, ())


def test_arbitrary_code_in_a_pickle_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    with path.open("wb") as handle:
        torch.save({"state_dict": {}, "x": _Payload()}, handle)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint_file(path)
    message = str(err.value)
    assert "refusing to load" in message and "evil.pth" in message and "posix.getcwd" in message
    assert "weights_only=False" not in message  # no advice to turn the protection off


def test_atomic_save_leaves_no_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "ckpt.pth"
    save_checkpoint_file({"state_dict": {"a": torch.ones(1)}}, target)
    with pytest.raises((TypeError, AttributeError, pickle.PicklingError)):  # unpicklable: the write fails
        save_checkpoint_file({"state_dict": {"a": torch.ones(1)}, "bad": lambda: None}, target)
    assert torch.equal(load_checkpoint_file(target)["state_dict"]["a"], torch.ones(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pth"]
