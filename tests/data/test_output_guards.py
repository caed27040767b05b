"""Output folders are never someone else's data: the real commands refuse to replace a folder vitadapter did
not write, and an output equal to, inside or around the input (issue: `--out` equal to `--raw` deleted the
raw dataset; a mistyped `--out ~` would have deleted a home folder)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from data.atomic import OWNER_MARKER
from pipelines.cli import main

TWIN = [
    "--num-train",
    "2",
    "--num-val",
    "1",
    "--min-size",
    "40",
    "--max-size",
    "56",
    "--num-classes-used",
    "3",
]


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    assert main(["data", "synthesize", "ade20k", "--out", str(tmp_path / "raw"), *TWIN]) == 0
    return tmp_path / "raw"


def test_prepare_into_its_own_input_is_refused_and_the_input_kept(
    raw: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    before = _tree_digest(raw)
    for out in (raw, raw / "shards"):
        assert main(["data", "prepare", "ade20k", "--raw", str(raw), "--out", str(out)]) == 1
    assert "is the input folder" in caplog.text and "is inside the input folder" in caplog.text
    assert (
        main(["data", "prepare", "ade20k", "--raw", str(raw / "ADEChallengeData2016"), "--out", str(raw)])
        == 1
    )
    assert "contains the input folder" in caplog.text
    assert _tree_digest(raw) == before  # nothing of the input was touched


def test_a_folder_vitadapter_did_not_write_is_refused_unless_forced(
    raw: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    for command in (
        ["data", "prepare", "ade20k", "--raw", str(raw), "--out", str(home)],
        ["data", "synthesize", "ade20k", "--out", str(home), *TWIN],
    ):
        assert main(command) == 1
        assert (home / "thesis.tex").read_text() == "years of work"
    assert "was not written by vitadapter" in caplog.text and "--force" in caplog.text
    # our own output is replaced without --force (it carries the marker) ...
    out = tmp_path / "shards"
    assert main(["data", "prepare", "ade20k", "--raw", str(raw), "--out", str(out)]) == 0
    assert (out / OWNER_MARKER).is_file()
    assert main(["data", "prepare", "ade20k", "--raw", str(raw), "--out", str(out), "--force"]) == 0
    # ... and a foreign folder only with --force, explicitly
    assert main(["data", "prepare", "ade20k", "--raw", str(raw), "--out", str(home), "--force"]) == 0
    assert (home / "index.json").is_file() and not (home / "thesis.tex").exists()
