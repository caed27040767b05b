"""Bad input: corrupt files, out-of-range labels, a missing dataset, half-written or altered shard folders."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from data.atomic import staging_path
from data.catalog import LabelError
from data.prepare import prepare_dataset
from data.readers import CorruptFileError, DatasetNotFoundError, find_samples
from data.shards import INDEX_FILE, IncompleteDatasetError, PreparedDataset, file_sha256, validate_prepared
from data.synthetic import encode_label_mat

ADE_TRAIN = "ADEChallengeData2016/images/training"
ADE_TRAIN_LABELS = "ADEChallengeData2016/annotations/training"


def test_corrupt_image_is_an_error_naming_the_file(ade_twin_copy: Path, tmp_path: Path) -> None:
    bad = ade_twin_copy / ADE_TRAIN / "ADE_train_00000002.jpg"
    bad.write_bytes(b"this is not a jpeg")
    with pytest.raises(CorruptFileError, match=r"ADE_train_00000002\.jpg"):
        prepare_dataset("ade20k", ade_twin_copy, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not staging_path(tmp_path / "out").exists()


def test_truncated_jpeg_is_corrupt(ade_twin_copy: Path, tmp_path: Path) -> None:
    bad = ade_twin_copy / ADE_TRAIN / "ADE_train_00000003.jpg"
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])
    with pytest.raises(CorruptFileError, match=r"ADE_train_00000003\.jpg"):
        prepare_dataset("ade20k", ade_twin_copy, tmp_path / "out")


def test_skip_corrupt_skips_and_counts(ade_twin_copy: Path, tmp_path: Path) -> None:
    (ade_twin_copy / ADE_TRAIN / "ADE_train_00000002.jpg").write_bytes(b"garbage")
    (ade_twin_copy / ADE_TRAIN_LABELS / "ADE_train_00000004.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    report = prepare_dataset("ade20k", ade_twin_copy, tmp_path / "out", skip_corrupt=True)
    train = report.index.splits["train"]
    assert train.num_samples == 2
    assert [s["key"] for s in train.skipped] == ["ADE_train_00000002", "ADE_train_00000004"]
    assert "ADE_train_00000004.png" in train.skipped[1]["reason"]
    assert PreparedDataset.open(tmp_path / "out").split("train").keys() == [
        "ADE_train_00000001",
        "ADE_train_00000003",
    ]


def test_corrupt_label_is_an_error(ade_twin_copy: Path, tmp_path: Path) -> None:
    (ade_twin_copy / ADE_TRAIN_LABELS / "ADE_train_00000001.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.raises(CorruptFileError, match=r"ADE_train_00000001\.png"):
        prepare_dataset("ade20k", ade_twin_copy, tmp_path / "out")


def test_missing_label_and_size_mismatch(ade_twin_copy: Path, tmp_path: Path) -> None:
    (ade_twin_copy / ADE_TRAIN_LABELS / "ADE_train_00000001.png").unlink()
    with pytest.raises(CorruptFileError, match=r"ADE_train_00000001\.png"):
        prepare_dataset("ade20k", ade_twin_copy, tmp_path / "out")
    cv2.imwrite(str(ade_twin_copy / ADE_TRAIN_LABELS / "ADE_train_00000001.png"), np.ones((5, 7), np.uint8))
    with pytest.raises(CorruptFileError, match=r"ADE_train_00000001.png.*differs"):
        prepare_dataset("ade20k", ade_twin_copy, tmp_path / "out")


def test_rgb_label_is_rejected(ade_twin_copy: Path, tmp_path: Path) -> None:
    label_path = ade_twin_copy / ADE_TRAIN_LABELS / "ADE_train_00000001.png"
    label = cv2.imread(str(label_path), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(label_path), np.dstack([label] * 3))
    with pytest.raises(LabelError, match="single-channel"):
        prepare_dataset("ade20k", ade_twin_copy, tmp_path / "out")


def test_out_of_range_label_names_the_file(ade_twin_copy: Path, tmp_path: Path) -> None:
    label_path = ade_twin_copy / ADE_TRAIN_LABELS / "ADE_train_00000003.png"
    label = cv2.imread(str(label_path), cv2.IMREAD_UNCHANGED)
    label[0, 0] = 151
    cv2.imwrite(str(label_path), label)
    with pytest.raises(LabelError, match=r"ADE_train_00000003.png.*151"):
        prepare_dataset("ade20k", ade_twin_copy, tmp_path / "out")
    report = prepare_dataset("ade20k", ade_twin_copy, tmp_path / "out", skip_corrupt=True)
    assert [s["key"] for s in report.index.splits["train"].skipped] == ["ADE_train_00000003"]


def test_pascal_mat_ids_outside_the_kept_list_are_ignored_and_beyond_459_an_error(
    twins: dict, tmp_path: Path
) -> None:
    """The original .mat LabelMaps annotate all 459 classes: the non-59 ones are background (ignored)."""
    root = tmp_path / "pascal"
    shutil.copytree(twins["pascal_context_59"].root, root)
    mat = root / "trainval" / "2008_000002.mat"
    from data.readers import decode_label_mat, find_samples, load_sample

    raw = decode_label_mat(mat.read_bytes(), source=str(mat))
    raw[1, 1] = 3  # "air conditioner": not one of the 59 classes
    raw[1, 2] = 2  # "aeroplane": class 0
    mat.write_bytes(encode_label_mat(raw))
    sample = next(s for s in find_samples("pascal_context_59", root, "train") if s.key == "2008_000002")
    label = load_sample(sample).label
    assert (label[1, 1], label[1, 2]) == (255, 0)
    raw[1, 1] = 460  # beyond the 459 classes
    mat.write_bytes(encode_label_mat(raw))
    with pytest.raises(LabelError, match=r"2008_000002.mat.*\[460\]"):
        prepare_dataset("pascal_context_59", root, tmp_path / "out")


@pytest.mark.parametrize(
    ("dataset", "names"),
    [
        ("ade20k", ["ADEChallengeData2016.zip"]),
        ("coco_stuff164k", ["train2017.zip", "val2017.zip", "stuffthingmaps_trainval2017.zip"]),
        ("pascal_context_59", ["VOCtrainval_03-May-2010.tar", "trainval.tar.gz"]),
    ],
)
def test_missing_dataset_names_downloads_and_place(tmp_path: Path, dataset: str, names: list[str]) -> None:
    empty = tmp_path / "raw"
    empty.mkdir()
    with pytest.raises(DatasetNotFoundError) as error:
        find_samples(dataset, empty, "train")
    for name in names:
        assert name in str(error.value)
    assert str(empty) in str(error.value)
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        prepare_dataset(dataset, tmp_path / "nowhere", tmp_path / "out")


def test_coco_labels_missing_is_reported(twins: dict, tmp_path: Path) -> None:
    root = tmp_path / "coco"
    shutil.copytree(twins["coco_stuff164k"].root / "images", root / "images")
    with pytest.raises(DatasetNotFoundError, match=r"stuffthingmaps_trainval2017\.zip"):
        find_samples("coco_stuff164k", root, "val")


def test_half_written_folder_is_refused_then_rebuilt(prepared: dict, twins: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(prepared["ade20k"].root, out)
    (out / INDEX_FILE).unlink()  # an interrupted writer never got to the index
    with pytest.raises(IncompleteDatasetError, match=r"no index\.json"):
        PreparedDataset.open(out)
    report = prepare_dataset("ade20k", twins["ade20k"].root, out, samples_per_shard=4)
    assert not report.reused and PreparedDataset.open(out, verify="sha256")


def test_truncated_or_missing_shard_is_refused(prepared: dict, twins: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(prepared["ade20k"].root, out)
    shard = out / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:1024])
    with pytest.raises(IncompleteDatasetError, match=r"train-000001\.tar"):
        PreparedDataset.open(out)
    shard.unlink()
    with pytest.raises(IncompleteDatasetError, match=r"train-000001.tar.*missing"):
        PreparedDataset.open(out)
    report = prepare_dataset("ade20k", twins["ade20k"].root, out, samples_per_shard=4)
    assert not report.reused  # not trusted: rebuilt
    assert file_sha256(shard) == file_sha256(prepared["ade20k"].root / "train-000001.tar")


def test_same_size_alteration_is_caught_by_checksum(prepared: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(prepared["ade20k"].root, out)
    shard = out / "val-000000.tar"
    data = bytearray(shard.read_bytes())
    data[-2000] ^= 0xFF
    shard.write_bytes(bytes(data))
    PreparedDataset.open(out, verify="size")  # size still matches
    with pytest.raises(IncompleteDatasetError, match="sha256"):
        PreparedDataset.open(out, verify="sha256")


def test_leftover_staging_folder_is_ignored_and_cleared(twins: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    staging = staging_path(out)
    staging.mkdir(parents=True)
    (staging / "train-000000.tar").write_bytes(b"half")
    prepare_dataset("ade20k", twins["ade20k"].root, out)
    assert not staging.exists() and PreparedDataset.open(out)


def test_validation_rejects_an_out_of_range_label_in_a_shard(prepared: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(prepared["ade20k"].root, out)
    shard = out / "val-000001.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    bad_label = np.full((8, 8), 150, dtype=np.uint8)  # ADE20K train ids stop at 149
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            if member.name.endswith(".label.png"):
                data = cv2.imencode(".png", bad_label)[1].tobytes()
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    index = json.loads((out / INDEX_FILE).read_text())
    entry = next(s for s in index["splits"]["val"]["shards"] if s["name"] == shard.name)
    entry.update(num_bytes=shard.stat().st_size, sha256=file_sha256(shard))
    (out / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(LabelError, match=r"val-000001.tar:ADE_val_00000005.label.png.*150"):
        validate_prepared(out)


def test_empty_image_and_decompression_bomb_are_messages_and_skippable(
    ade_twin_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from PIL import Image

    from pipelines.cli import main

    (ade_twin_copy / ADE_TRAIN / "ADE_train_00000002.jpg").write_bytes(b"")  # zero bytes: cv2.error before
    args = ["data", "prepare", "ade20k", "--raw", str(ade_twin_copy), "--out", str(tmp_path / "out")]
    assert main(args) == 1
    assert "ADE_train_00000002.jpg: empty file (0 bytes)" in caplog.text
    # a label map beyond Pillow's decompression-bomb limit (the limit lowered so a small file exceeds it)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    caplog.clear()
    assert main([*args, "--skip-corrupt"]) == 0
    skipped = {
        s["key"]: s["reason"]
        for s in json.loads((tmp_path / "out" / INDEX_FILE).read_text())["splits"]["train"]["skipped"]
    }
    assert "empty file" in skipped["ADE_train_00000002"]
    assert "decompression bomb" in skipped["ADE_train_00000001"]
    # the same files through `evaluate --data RAW` are messages too (no traceback)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 89_478_485)
    (ade_twin_copy / "ADEChallengeData2016/images/validation/ADE_val_00000001.jpg").write_bytes(b"")
    import models
    from pipelines.runs.inputs import eval_items

    source = eval_items(models.get_config("upernet_deit_adapter_tiny_512_160k_ade20k"), ade_twin_copy)
    with pytest.raises(CorruptFileError, match=r"ADE_val_00000001\.jpg: empty file"):
        list(source.items)


def test_a_jpeg_with_trailing_bytes_is_valid(ade_twin_copy: Path, tmp_path: Path) -> None:
    image = ade_twin_copy / ADE_TRAIN / "ADE_train_00000003.jpg"
    original = cv2.imdecode(np.frombuffer(image.read_bytes(), np.uint8), cv2.IMREAD_COLOR)
    image.write_bytes(image.read_bytes() + b"\x00trailing metadata" * 200)  # 3.6 kB after the end marker
    report = prepare_dataset("ade20k", ade_twin_copy, tmp_path / "out")
    assert report.index.splits["train"].num_samples == 4
    split = PreparedDataset.open(tmp_path / "out").split("train")
    decoded, _ = split.record(split.keys().index("ADE_train_00000003")).decode()
    assert np.array_equal(decoded, original)


def test_a_sample_key_that_is_a_path_is_refused(
    ade_twin_copy: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A shard whose key is an absolute path: `data validate` used to pass it and `evaluate` wrote an overlay there."""
    from pipelines.cli import main

    out = tmp_path / "out"
    prepare_dataset("ade20k", ade_twin_copy, out)
    shard = out / "val-000000.tar"
    rewritten = tmp_path / "rewritten.tar"
    with tarfile.open(shard) as src, tarfile.open(rewritten, "w") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read()
            member.name = member.name.replace("ADE_val_00000001", str(tmp_path / "evil"))
            dst.addfile(member, io.BytesIO(data))
    shutil.copyfile(rewritten, shard)
    index = json.loads((out / INDEX_FILE).read_text())
    info = index["splits"]["val"]["shards"][0]
    info.update(num_bytes=shard.stat().st_size, sha256=file_sha256(shard))
    (out / INDEX_FILE).write_text(json.dumps(index))
    assert main(["data", "validate", str(out)]) == 1
    assert "is not a plain name" in caplog.text and "evil" in caplog.text
    assert not (tmp_path / "evil.png").exists()
