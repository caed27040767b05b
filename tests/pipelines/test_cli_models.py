"""``vitadapter configs`` and ``vitadapter checkpoint`` end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import models
from models.checkpoint import load_checkpoint_file
from pipelines.cli import main
from pipelines.commands.configs import JSON_FIELDS
from pipelines.engine.checkpoints import save_checkpoint_file
from reference_data import reference_param_counts

NAME = "upernet_deit_adapter_tiny_512_160k_ade20k"
TINY_SET = ["--preset", "tiny"]


def test_configs_list_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["configs", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 24 and sum(not row["extension"] for row in rows) == 16  # 16 published + 8 extensions
    assert all(row["num_params"] > 0 for row in rows)
    assert all(tuple(row) == JSON_FIELDS for row in rows)
    counts = reference_param_counts()
    by_name = {row["name"]: row for row in rows}
    for name in models.list_configs(head="upernet"):
        assert by_name[name]["num_params"] == counts[name]
    tiny = by_name[NAME]
    assert (tiny["dataset"], tiny["head"], tiny["crop_size"], tiny["iters"]) == (
        "ade20k",
        "upernet",
        512,
        160000,
    )
    assert (tiny["miou_ss"], tiny["miou_ms"], tiny["params_published_m"]) == (42.6, 43.6, 36)
    assert by_name["mask2former_beitv2_adapter_large_896_160k_ade20k"]["miou_ss"] is None


def test_configs_list_table_and_show(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["configs", "list", "--dataset", "pascal_context_59"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["name", "dataset", "head"]
    assert len(out) == 4 and "67.0 / 67.5" in out[2]
    assert main(["configs", "show", NAME, "--set", "decode_head.channels=32"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["decode_head"]["channels"] == 32 and shown["optimizer"]["lr"] == 1.2e-4


def test_bad_input_is_a_clear_error(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    assert main(["configs", "show", "nope"]) == 1
    assert "unknown zoo entry 'nope'" in caplog.text
    assert main(["configs", "show", NAME, "--set", "embed_dimm=3"]) == 1
    assert "override 'embed_dimm'" in caplog.text and "no such field" in caplog.text
    assert (
        main(["checkpoint", "import", NAME, str(tmp_path / "missing.pth"), "--out", str(tmp_path / "x.pth")])
        == 1
    )
    assert "missing.pth does not exist" in caplog.text


def test_import_then_export_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = models.create_segmentor(NAME, preset="tiny")
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    src = save_checkpoint_file({"meta": {"iter": 7}, "state_dict": state}, tmp_path / "official.pth")
    sets = TINY_SET
    assert main(["checkpoint", "import", NAME, str(src), "--out", str(tmp_path / "ours.pth"), *sets]) == 0
    ours = load_checkpoint_file(tmp_path / "ours.pth")
    assert ours["config"] == NAME and ours["format"] == "vitadapter"
    report = json.loads((tmp_path / "ours.pth.keys.json").read_text())
    assert report["missing"] == report["unexpected"] == report["mismatched"] == []
    assert len(report["loaded"]) == len(state)
    assert (
        main(
            [
                "checkpoint",
                "export",
                NAME,
                str(tmp_path / "ours.pth"),
                "--out",
                str(tmp_path / "back.pth"),
                *sets,
            ]
        )
        == 0
    )
    back = load_checkpoint_file(tmp_path / "back.pth")
    assert list(back["state_dict"]) == list(state)
    for key, value in state.items():
        assert torch.equal(back["state_dict"][key], value), key
    assert (
        back["meta"]["config"] == "segmentation/configs/ade20k/upernet_deit_adapter_tiny_512_160k_ade20k.py"
    )


def test_import_refuses_a_checkpoint_of_another_model(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    torch.manual_seed(0)
    model = models.create_segmentor(NAME, {"conv_inplane": 64}, preset="tiny")
    src = save_checkpoint_file({"state_dict": model.state_dict()}, tmp_path / "other.pth")
    sets = TINY_SET
    assert main(["checkpoint", "import", NAME, str(src), "--out", str(tmp_path / "ours.pth"), *sets]) == 1
    assert "does not match zoo entry" in caplog.text and "backbone.spm.stem.0.weight" in caplog.text
    assert not (tmp_path / "ours.pth").exists()


def test_console_script_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "checkpoint", "import", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "official ViT-Adapter checkpoint" in out.stdout and "--set PATH=VALUE" in out.stdout
