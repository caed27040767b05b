"""``vitadapter data`` sub-commands, driven through their argparse registration."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from data.readers import DatasetNotFoundError
from data.shards import INDEX_FILE
from pipelines.commands import data as data_command


def _run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="vitadapter")
    data_command.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(list(argv))
    return args.func(args)


def test_synthesize_prepare_validate(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    twin, out = tmp_path / "twin", tmp_path / "shards"
    args = ["--num-train", "3", "--num-val", "2", "--seed", "4", "--min-size", "32", "--max-size", "48"]
    assert (
        _run("data", "synthesize", "pascal_context_59", "--out", str(twin), *args, "--classes", "0,58") == 0
    )
    assert (twin / "trainval" / "2008_000003.mat").is_file()
    assert _run("data", "prepare", "pascal_context_59", "--raw", str(twin), "--out", str(out)) == 0
    index = json.loads((out / INDEX_FILE).read_text())
    assert index["splits"]["train"]["num_samples"] == 3 and index["splits"]["val"]["num_samples"] == 2
    used = [i for i, count in enumerate(index["splits"]["train"]["class_pixels"]) if count]
    assert set(used) <= {0, 58}
    assert _run("data", "validate", str(out), "--decode-images") == 0
    assert _run("data", "list") == 0
    assert "pascal_context_59" in capsys.readouterr().out


def test_prepare_options_and_missing_dataset(tmp_path: Path) -> None:
    twin, out = tmp_path / "twin", tmp_path / "shards"
    _run(
        "data",
        "synthesize",
        "ade20k",
        "--out",
        str(twin),
        "--num-train",
        "3",
        "--num-val",
        "1",
        "--min-size",
        "32",
        "--max-size",
        "64",
    )
    assert _run("data", "prepare", "ade20k", "--raw", str(twin), "--out", str(out), "--splits", "val") == 0
    assert sorted(json.loads((out / INDEX_FILE).read_text())["splits"]) == ["val"]
    with pytest.raises(DatasetNotFoundError, match=r"ADEChallengeData2016\.zip"):
        (tmp_path / "empty").mkdir()
        _run("data", "prepare", "ade20k", "--raw", str(tmp_path / "empty"), "--out", str(tmp_path / "x"))
    assert _run("data") == 2  # no action: help


def test_bad_choice_is_refused() -> None:
    with pytest.raises(SystemExit):
        _run("data", "prepare", "cityscapes", "--raw", ".", "--out", ".")
