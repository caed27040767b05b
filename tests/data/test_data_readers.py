"""Readers: official archives read in place, mmsegmentation's converted layouts, split-list fallback."""

from __future__ import annotations

import json
import shutil
import tarfile
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from data.catalog import PASCAL_CONTEXT_KEPT_IDS, lookup_table
from data.prepare import prepare_dataset
from data.provenance import dataset_source
from data.readers import decode_label_image, decode_label_mat, find_samples, load_sample
from data.shards import PreparedDataset, file_sha256


def _zip_folder(folder: Path, archive: Path, arcname_root: str) -> None:
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, f"{arcname_root}/{path.relative_to(folder).as_posix()}")


def _shard_digests(root: Path) -> dict[str, str]:
    """Every file's sha256; index.json's without its ``source`` (the raw files read: archives or a twin)."""
    digests = {p.name: file_sha256(p) for p in sorted(root.iterdir())}
    index = json.loads((root / "index.json").read_text())
    assert index.pop("source")["kind"] in ("official", "synthetic")
    digests["index.json"] = json.dumps(index, sort_keys=True)
    return digests


def _labels(root: Path, split: str) -> dict[str, np.ndarray]:
    prepared_split = PreparedDataset.open(root).split(split)
    return {r.key: r.decode()[1] for r in (prepared_split.record(i) for i in range(len(prepared_split)))}


def test_ade20k_zip_gives_the_same_shards(twins: dict, prepared: dict, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    _zip_folder(
        twins["ade20k"].root / "ADEChallengeData2016",
        raw / "ADEChallengeData2016.zip",
        "ADEChallengeData2016",
    )
    samples = find_samples("ade20k", raw, "val")
    assert (
        samples[0]
        .image.describe()
        .endswith("ADEChallengeData2016.zip:ADEChallengeData2016/images/validation/ADE_val_00000001.jpg")
    )
    out = prepare_dataset("ade20k", raw, tmp_path / "out", samples_per_shard=4).root
    assert _shard_digests(out) == _shard_digests(prepared["ade20k"].root)
    archive = raw / "ADEChallengeData2016.zip"  # the index records the archive read, with its checksum
    assert dataset_source(out) == {
        "kind": "official",
        "archives": [{"file": archive.name, "bytes": archive.stat().st_size, "sha256": file_sha256(archive)}],
        "folders": [],
    }
    assert dataset_source(prepared["ade20k"].root)["kind"] == "synthetic"


def test_coco_zips_give_the_same_shards(twins: dict, prepared: dict, tmp_path: Path) -> None:
    twin, raw = twins["coco_stuff164k"].root, tmp_path / "raw"
    raw.mkdir()
    for folder in ("train2017", "val2017"):
        _zip_folder(twin / "images" / folder, raw / f"{folder}.zip", folder)
    with zipfile.ZipFile(raw / "stuffthingmaps_trainval2017.zip", "w") as zf:
        for path in sorted((twin / "annotations").rglob("*.png")):
            zf.write(path, path.relative_to(twin / "annotations").as_posix())
    out = prepare_dataset("coco_stuff164k", raw, tmp_path / "out", samples_per_shard=4).root
    assert _shard_digests(out) == _shard_digests(prepared["coco_stuff164k"].root)


def test_coco_converted_train_id_maps_are_read_as_is(twins: dict, prepared: dict, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    shutil.copytree(twins["coco_stuff164k"].root, raw)
    table = lookup_table("coco_stuff_raw")
    for path in sorted((raw / "annotations").rglob("*.png")):
        train_ids = table[decode_label_image(path.read_bytes(), source=str(path))].astype(np.uint8)
        cv2.imwrite(str(path.with_name(f"{path.stem}_labelTrainIds.png")), train_ids)
        path.unlink()
    samples = find_samples("coco_stuff164k", raw, "train")
    assert {s.encoding for s in samples} == {"coco_stuff_train_ids"}
    out = prepare_dataset("coco_stuff164k", raw, tmp_path / "out").root
    for split in ("train", "val"):
        converted, reference = _labels(out, split), _labels(prepared["coco_stuff164k"].root, split)
        assert converted.keys() == reference.keys()
        for key, label in converted.items():
            np.testing.assert_array_equal(label, reference[key])


def test_pascal_archives_give_the_same_shards(twins: dict, prepared: dict, tmp_path: Path) -> None:
    twin, raw = twins["pascal_context_59"].root, tmp_path / "raw"
    raw.mkdir()
    with tarfile.open(raw / "VOCtrainval_03-May-2010.tar", "w") as tar:
        tar.add(twin / "VOCdevkit", "VOCdevkit")
    with tarfile.open(raw / "trainval.tar.gz", "w:gz") as tar:
        tar.add(twin / "trainval", "trainval")
    sample = find_samples("pascal_context_59", raw, "train")[0]
    assert "trainval.tar.gz:trainval/" in sample.label.describe()
    assert load_sample(sample).label.dtype == np.uint8
    out = prepare_dataset("pascal_context_59", raw, tmp_path / "out", samples_per_shard=4).root
    assert _shard_digests(out) == _shard_digests(prepared["pascal_context_59"].root)


def test_pascal_converted_59_class_maps(twins: dict, prepared: dict, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    shutil.copytree(twins["pascal_context_59"].root / "VOCdevkit", raw / "VOCdevkit")
    to_59 = np.zeros(460, dtype=np.uint8)
    to_59[list(PASCAL_CONTEXT_KEPT_IDS)] = np.arange(60)
    png_folder = raw / "VOCdevkit/VOC2010/SegmentationClassContext"
    png_folder.mkdir()
    for mat in sorted((twins["pascal_context_59"].root / "trainval").glob("*.mat")):
        cv2.imwrite(str(png_folder / f"{mat.stem}.png"), to_59[decode_label_mat(mat.read_bytes(), source="")])
    assert {s.encoding for s in find_samples("pascal_context_59", raw, "val")} == {"pascal_context_59"}
    out = prepare_dataset("pascal_context_59", raw, tmp_path / "out").root
    reference = _labels(prepared["pascal_context_59"].root, "val")
    for key, label in _labels(out, "val").items():
        np.testing.assert_array_equal(label, reference[key])


def test_pascal_split_falls_back_to_voc_main_lists(
    twins: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    raw = tmp_path / "raw"
    shutil.copytree(twins["pascal_context_59"].root, raw)
    voc = raw / "VOCdevkit/VOC2010"
    shutil.rmtree(voc / "ImageSets/SegmentationContext")
    (voc / "ImageSets/Main").mkdir(parents=True)
    (voc / "ImageSets/Main/val.txt").write_text("2010_000002\n2007_999999\n2010_000001\n")
    samples = find_samples("pascal_context_59", raw, "val")
    assert [s.key for s in samples] == ["2010_000001", "2010_000002"]  # unannotated id dropped
    assert "ImageSets/Main" in caplog.text
