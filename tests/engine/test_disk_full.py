"""A full disk, for real: a small tmpfs the test mounts (root only; skipped, saying so, elsewhere).

Every writer (checkpoints, shards and their index, metrics, reports, predictions, logs) that meets the full disk
gives one line naming the path, the bytes it needed and the space free; the previous file is intact and no
partial file is left. Training stops naming the checkpoint it could not write and keeps its last good one; once
space is freed the same command resumes."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from data.atomic import WriteError, append_line, write_bytes_atomic, write_json_atomic
from data.prepare import prepare_dataset
from data.synthetic import synthesize
from micro_params import ade_twin_shards, cli_model_args, tiny_model
from models.checkpoint import load_checkpoint_file
from pipelines.cli import main
from pipelines.engine.checkpoints import checkpoint_bytes, save_checkpoint_file
from pipelines.runs.folder import RunFolder

NAME = "upernet_deit_adapter_tiny_512_160k_ade20k"
DISK = "24m"
TWIN = {"num_train": 8, "num_val": 2, "min_size": 64, "max_size": 96, "num_classes_used": 4}


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 24 MB tmpfs mounted for the test and unmounted after it."""
    if os.geteuid() != 0:
        pytest.skip("the full-disk tests mount a tmpfs, which needs root; run them as root")
    mount = tmp_path / "disk"
    mount.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={DISK}", "tmpfs", str(mount)],
            capture_output=True,
            text=True,
        )
    except FileNotFoundError:
        pytest.skip("no mount command on this machine: cannot make a small file system")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}): the full-disk tests need one")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture(scope="module")
def twin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ade_twin_shards(tmp_path_factory.mktemp("twin"), seed=6, **TWIN)


def _fill(disk: Path, leave: int) -> Path:
    """A file taking all of ``disk``'s free space but ``leave`` bytes."""
    stat = os.statvfs(disk)
    filler = disk / "filler"
    filler.write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - leave))
    return filler


def _leftovers(folder: Path) -> list[str]:
    """Temporary files of atomic writes and staging folders: what a failed write must not leave."""
    return sorted(p.name for p in folder.rglob(".*") if p.name.endswith((".tmp", ".partial")))


def test_training_on_a_full_disk_stops_naming_the_checkpoint_and_resumes_when_freed(
    twin: Path, small_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # the run's checkpoint: the weights and AdamW's two moments of every parameter
    model = tiny_model(NAME)
    size = checkpoint_bytes({"state_dict": model.state_dict()}) + 2 * sum(
        p.numel() * p.element_size() for p in model.parameters()
    )
    filler = _fill(small_disk, leave=3 * size // 2)  # room for one checkpoint, not for the next beside it
    work = small_disk / "run"
    args = ["train", "--no-tracking", NAME, "--data", str(twin), "--work-dir", str(work), "--no-progress"]
    args += ["--max-iters", "2", "--batch-size", "2", "--global-batch", "2", "--checkpoint-interval", "1"]
    args += ["--log-interval", "1", "--eval-interval", "1000", "--pretrained", "none", "--num-workers", "0"]
    args += cli_model_args()
    assert main(args) == 1
    message = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"][-1]
    written = work / "iter_0000001.pth"
    assert message.startswith(
        f"iteration 2: cannot write {work / 'iter_0000002.pth'}: No space left on device (needs about "
    )
    needed, free = (int(n) for n in re.findall(r"(\d+) bytes", message)[:2])
    assert free < needed  # the space free there (statvfs) is less than what the checkpoint needs
    # the estimate is the tensors' bytes plus the zip records: it is at least the real file's storages
    assert abs(needed - written.stat().st_size) < 0.05 * written.stat().st_size
    assert f"training stopped; the last good checkpoint is {written}" in message and "\n" not in message
    assert RunFolder(work).read_log()[-1] == {"iteration": 2, "failed": "disk", "error": message}
    # the checkpoint before it is whole, latest.json names it, nothing partial is left
    assert load_checkpoint_file(written)["iteration"] == 1
    assert json.loads((work / "latest.json").read_text())["file"] == written.name
    assert not list(work.glob("iter_0000002*")) and _leftovers(small_disk) == []

    filler.unlink()  # space freed: the same command resumes from iteration 1 and finishes
    caplog.clear()
    assert main(args) == 0
    assert f"resuming from {written}" in caplog.text
    assert [r["iteration"] for r in RunFolder(work).read_log()] == [1, 2]  # the failure record dropped
    assert (
        load_checkpoint_file(work / "iter_0000002.pth")["iteration"] == 2
        and (work / "best_mIoU.pth").is_file()
    )


def test_every_writer_on_a_full_disk_names_the_path_and_keeps_the_previous_file(
    small_disk: Path, tmp_path: Path
) -> None:
    metrics = write_json_atomic(small_disk / "metrics.json", {"mIoU": 41.5})
    report = write_bytes_atomic(small_disk / "report.png", b"previous image")
    checkpoint = save_checkpoint_file({"state_dict": {"w": torch.ones(8)}}, small_disk / "model.pth")
    log = append_line(small_disk / "train_log.jsonl", json.dumps({"iteration": 1, "loss": 0.5}))
    shards = prepare_dataset(
        "ade20k", synthesize("ade20k", tmp_path / "raw", seed=1, **TWIN).root, small_disk / "data"
    )
    other_raw = synthesize("ade20k", tmp_path / "raw2", seed=2, **TWIN).root
    before = {p: p.read_bytes() for p in small_disk.rglob("*") if p.is_file()}
    _fill(small_disk, leave=16 * 1024)

    writes = {
        metrics: lambda: write_json_atomic(metrics, {"mIoU": 42.0, "per_class": list(range(40_000))}),
        report: lambda: write_bytes_atomic(report, b"\x89PNG" + bytes(200_000)),
        checkpoint: lambda: save_checkpoint_file({"state_dict": {"w": torch.ones(100_000)}}, checkpoint),
        log: lambda: append_line(log, json.dumps({"iteration": 2, "note": "x" * 100_000})),
        shards.root: lambda: prepare_dataset("ade20k", other_raw, small_disk / "data"),
    }
    for path, write in writes.items():
        with pytest.raises(WriteError) as caught:
            write()
        message = str(caught.value)
        verb = "append to" if path == log else "write"
        assert message.startswith(f"cannot {verb} {path}"), (
            message
        )  # a shard file under the folder, for shards
        assert "No space left on device (needs " in message and " free there)" in message, message
        assert caught.value.errno == errno.ENOSPC and caught.value.free is not None and "\n" not in message
        if path != shards.root:  # a file's size is known (for a folder: what was written when it failed)
            assert caught.value.needed is not None and caught.value.needed > caught.value.free
    after = {p: p.read_bytes() for p in small_disk.rglob("*") if p.is_file() and p.name != "filler"}
    assert after == before  # every previous file as it was, the shard folder too
    assert _leftovers(small_disk) == []
