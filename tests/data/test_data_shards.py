"""Shard round trip for each twin, index contents, idempotent and atomic preparation."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from data.atomic import OWNER_MARKER
from data.catalog import get_dataset, to_train_ids
from data.prepare import prepare_dataset
from data.readers import decode_label_image, decode_label_mat, find_samples
from data.shards import INDEX_FILE, PreparedDataset, decode_label_png, file_sha256

DATASETS = ["ade20k", "coco_stuff164k", "pascal_context_59"]


def _raw_train_ids(path: Path, encoding: str) -> np.ndarray:
    data = path.read_bytes()
    raw = (
        decode_label_mat(data, source=str(path))
        if path.suffix == ".mat"
        else decode_label_image(data, source="")
    )
    return to_train_ids(raw, encoding, source=str(path))


@pytest.mark.parametrize("dataset", DATASETS)
def test_round_trip_bytes_and_labels(twins: dict, prepared: dict, dataset: str) -> None:
    twin_root = twins[dataset].root
    prepared_dataset = PreparedDataset.open(prepared[dataset].root, verify="sha256")
    for split in ("train", "val"):
        samples = {s.key: s for s in find_samples(dataset, twin_root, split)}
        shard_split = prepared_dataset.split(split)
        assert len(shard_split) == len(samples) == {"train": 6, "val": 5}[split]
        assert shard_split.keys() == sorted(samples)
        for position in range(len(shard_split)):
            record = shard_split.record(position)
            sample = samples[record.key]
            image_path = Path(sample.image.describe())
            assert record.image_bytes == image_path.read_bytes()  # original bytes, not re-encoded
            expected = _raw_train_ids(Path(sample.label.describe()), sample.encoding)
            label = decode_label_png(record.label_bytes, source=record.key)
            np.testing.assert_array_equal(label, expected)
            assert (record.meta["height"], record.meta["width"]) == expected.shape
            assert record.meta["image_file"] == sample.image.name
            assert record.meta["label_file"] == sample.label.name
            assert record.meta["label_encoding"] == sample.encoding
            image, decoded_label = record.decode()
            assert image.shape == (*expected.shape, 3) and image.dtype == np.uint8
            np.testing.assert_array_equal(decoded_label, expected)


def test_label_members_are_single_channel_8bit_png(prepared: dict) -> None:
    shard = prepared["ade20k"].root / "train-000000.tar"
    with tarfile.open(shard) as tar:
        names = tar.getnames()
        label_bytes = tar.extractfile(next(n for n in names if n.endswith(".label.png"))).read()
    assert {n.split(".", 1)[1] for n in names} == {"jpg", "label.png", "json"}
    assert label_bytes[:8] == b"\x89PNG\r\n\x1a\n"
    # IHDR: bit depth 8 at byte 24, colour type 0 (greyscale) at byte 25
    assert label_bytes[24] == 8 and label_bytes[25] == 0


@pytest.mark.parametrize("dataset", DATASETS)
def test_index_counts_histograms_checksums(twins: dict, prepared: dict, dataset: str) -> None:
    root = prepared[dataset].root
    index = json.loads((root / INDEX_FILE).read_text())
    info = get_dataset(dataset)
    assert index["dataset"] == dataset and index["num_classes"] == info.num_classes
    assert index["label_convention"] == info.label_convention
    assert index["class_names"] == list(info.class_names)
    for split, expected_count in (("train", 6), ("val", 5)):
        split_index = index["splits"][split]
        assert split_index["num_samples"] == expected_count and split_index["skipped"] == []
        assert [s["num_samples"] for s in split_index["shards"]] == [4, expected_count - 4]
        for shard in split_index["shards"]:
            assert file_sha256(root / shard["name"]) == shard["sha256"]
        histogram = np.zeros(info.num_classes, dtype=np.int64)
        ignored = 0
        for sample in find_samples(dataset, twins[dataset].root, split):
            label = _raw_train_ids(Path(sample.label.describe()), sample.encoding)
            counts = np.bincount(label.ravel(), minlength=256)
            histogram += counts[: info.num_classes]
            ignored += int(counts[255])
        assert split_index["class_pixels"] == histogram.tolist()
        assert split_index["ignore_pixels"] == ignored


def test_rerun_is_idempotent_and_force_gives_same_bytes(twins: dict, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    first = prepare_dataset("pascal_context_59", twins["pascal_context_59"].root, out, samples_per_shard=3)
    digests = {p.name: file_sha256(p) for p in out.iterdir()}
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = prepare_dataset("pascal_context_59", twins["pascal_context_59"].root, out, samples_per_shard=3)
    assert not first.reused and again.reused
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes  # nothing rewritten
    forced = prepare_dataset(
        "pascal_context_59", twins["pascal_context_59"].root, out, samples_per_shard=3, force=True
    )
    assert not forced.reused
    assert {p.name: file_sha256(p) for p in out.iterdir()} == digests  # same inputs, same bytes
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no staging folder left


def test_other_options_rebuild(twins: dict, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    prepare_dataset("ade20k", twins["ade20k"].root, out, samples_per_shard=3)
    limited = prepare_dataset(
        "ade20k", twins["ade20k"].root, out, samples_per_shard=3, limit=2, splits=["val"]
    )
    assert not limited.reused
    assert sorted(p.name for p in out.iterdir()) == [OWNER_MARKER, INDEX_FILE, "val-000000.tar"]
    assert PreparedDataset.open(out).split("val").keys() == ["ADE_val_00000001", "ADE_val_00000002"]


def test_parallel_workers_give_identical_shards(twins: dict, prepared: dict, tmp_path: Path) -> None:
    out = tmp_path / "parallel"
    prepare_dataset("coco_stuff164k", twins["coco_stuff164k"].root, out, samples_per_shard=4, workers=2)
    reference = prepared["coco_stuff164k"].root
    assert {p.name: file_sha256(p) for p in out.iterdir()} == {
        p.name: file_sha256(p) for p in reference.iterdir()
    }
