"""Shards damaged after preparation (truncated files, an image that no longer decodes): every reader names the
shard file and the sample key in one line, also from loader worker processes; ``skip_corrupt`` skips instead."""

from __future__ import annotations

import shutil
import tarfile
from itertools import islice
from pathlib import Path

import pytest

from data.loaders import build_eval_loader, build_train_loader
from data.shards import CorruptSampleError, PreparedDataset, ShardFile
from data.train_transforms import TrainPipeline

PIPELINE = TrainPipeline(scale=(128, 32), crop_size=(32, 32), to_mask=False)


@pytest.fixture
def shards(prepared: dict, tmp_path: Path) -> Path:
    """An alterable copy of the prepared ADE20K twin (train: 4 + 2 samples, val: 4 + 1, in shards of 4)."""
    return Path(shutil.copytree(prepared["ade20k"].root, tmp_path / "shards"))


def _members(shard: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(shard) as tar:
        return tar.getmembers()


def spoil_image(shard: Path, number: int = 0) -> str:
    """Overwrite the image bytes of sample ``number`` of ``shard`` with zeros (same size); its key."""
    member = [m for m in _members(shard) if m.name.endswith(".jpg")][number]
    with shard.open("r+b") as handle:
        handle.seek(member.offset_data)
        handle.write(bytes(member.size))
    return member.name.partition(".")[0]


def test_a_shard_truncated_before_it_is_opened_names_the_first_sample_cut_off(shards: Path) -> None:
    shard = shards / "train-000000.tar"
    third_image = [m for m in _members(shard) if m.name.endswith(".jpg")][2]
    size = shard.stat().st_size
    with shard.open("r+b") as handle:
        handle.truncate(third_image.offset_data + 10)  # inside the third sample's image
    with pytest.raises(CorruptSampleError) as caught:
        PreparedDataset.open(shards)
    key = third_image.name.partition(".")[0]
    assert str(caught.value) == (
        f"{shard}: sample {key!r} cannot be read: the shard is truncated ({third_image.offset_data + 10} of "
        f"{size} bytes, as index.json records); prepare again"
    )


def test_damage_met_while_reading_names_the_shard_and_the_key(shards: Path) -> None:
    split = PreparedDataset.open(shards).split("train")
    split.record(0)  # the shard is listed: a truncation now is met when the bytes are read
    shard = shards / "train-000000.tar"
    last = [m for m in _members(shard) if m.name.endswith(".jpg")][-1]
    with shard.open("r+b") as handle:
        handle.truncate(last.offset_data + 100)
    key = last.name.partition(".")[0]
    with pytest.raises(
        CorruptSampleError,
        match=rf"^{shard}: sample '{key}' cannot be read: member {key}.jpg is cut short \(100 of {last.size} bytes",
    ):
        split.record(3)
    # opened after the truncation: the listing ends early, the missing samples are named by number
    fresh = PreparedDataset.open(shards, verify="none").split("train")
    listed = ShardFile(shard).keys
    with pytest.raises(CorruptSampleError) as caught:
        fresh.record(3)
    assert caught.value.key in (key, None) and str(shard) in str(caught.value)
    if caught.value.key is None:
        assert f"sample 4 of 4 is missing from the shard (the last readable one is {listed[-1]!r})" in str(
            caught.value
        )
    # an image that no longer decodes, the file's size unchanged (so opening the folder passes)
    spoiled = spoil_image(shards / "train-000001.tar")
    with pytest.raises(CorruptSampleError) as caught:
        PreparedDataset.open(shards, verify="none").split("train").record(4).decode()
    assert str(caught.value).startswith(
        f"{shards / 'train-000001.tar'}: sample {spoiled!r} cannot be read: image: "
    )


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_workers_hand_the_corrupt_sample_to_the_main_process(shards: Path, workers: int) -> None:
    train_key = spoil_image(shards / "train-000000.tar", 1)
    val_key = spoil_image(shards / "val-000000.tar", 2)
    # training: an error naming the shard and the key, not the worker's traceback
    loader = build_train_loader(shards, PIPELINE, batch_size=2, seed=0, num_workers=workers)
    with pytest.raises(CorruptSampleError) as caught:
        list(islice(iter(loader), 3))  # one pass over the 6 samples
    assert caught.value.key == train_key and "\n" not in str(caught.value)
    assert str(caught.value).startswith(f"{shards / 'train-000000.tar'}: sample {train_key!r} cannot be read")
    evaluation = build_eval_loader(shards, num_workers=workers)
    with pytest.raises(CorruptSampleError, match=rf"^{shards / 'val-000000.tar'}: sample '{val_key}' "):
        list(evaluation)
    # skip_corrupt: the training sample is replaced by the next readable one (full batches), and listed
    loader = build_train_loader(
        shards, PIPELINE, batch_size=2, seed=0, num_workers=workers, skip_corrupt=True
    )
    batches = list(islice(iter(loader), 3))
    assert all(len(batch["keys"]) == 2 for batch in batches) and train_key not in {
        k for b in batches for k in b["keys"]
    }
    (skipped,) = [record for batch in batches for record in batch.get("skipped", ())]
    assert skipped["key"] == train_key and skipped["shard"] == str(shards / "train-000000.tar")
    assert skipped["replaced_by"] in {k for b in batches for k in b["keys"]}
    # the evaluation sample is left out and listed
    evaluation = build_eval_loader(shards, num_workers=workers, skip_corrupt=True)
    keys = [item["key"] for item in evaluation]
    assert len(keys) == 4 and val_key not in keys
    assert [record["key"] for record in evaluation.skipped] == [val_key]
