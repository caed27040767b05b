"""Pascal Context from the Detail API's ``trainval_merged.json``: RLE and polygons, ``getMask``'s painting
order, the 59-class reduction, split membership, source precedence, and the JSON twin's round trip."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from data.catalog import LabelError, lookup_table
from data.pascal_detail import (
    DETAIL_JSON,
    DetailFormatError,
    decode_rle,
    decode_rle_string,
    decode_segmentation,
    encode_rle,
    encode_rle_string,
    parse_detail_json,
    polygons_to_mask,
)
from data.prepare import PrepareReport, prepare_dataset
from data.readers import CorruptFileError, DatasetNotFoundError, decode_label_mat, find_samples, load_sample
from data.shards import PreparedDataset
from data.synthetic import TwinReport, synthesize
from pipelines.commands import data as data_command

VOC = "VOCdevkit/VOC2010"
SPLITS = ("train", "val")
TWIN = {"num_train": 6, "num_val": 5, "seed": 3, "min_size": 40, "max_size": 72, "num_classes_used": 6}
SAMPLES_PER_SHARD = 4


# ------------------------------------------------------------------------------------------------ helpers
def _records(root: Path, split: str) -> dict[str, tuple[bytes, np.ndarray, dict[str, Any]]]:
    prepared_split = PreparedDataset.open(root).split(split)
    out = {}
    for index in range(len(prepared_split)):
        record = prepared_split.record(index)
        out[record.key] = (record.image_bytes, record.decode()[1], record.meta)
    return out


def _rle(mask: list[list[int]]) -> dict[str, Any]:
    return encode_rle(np.asarray(mask, dtype=bool))


def _write_raw(
    root: Path,
    images: dict[str, tuple[str, int, int]],
    annotations: list[dict[str, Any]],
    *,
    json_folder: str = VOC,
) -> Path:
    """A hand-made download: grey JPEGs of the given sizes and a ``trainval_merged.json`` of ``annotations``."""
    jpegs = root / VOC / "JPEGImages"
    jpegs.mkdir(parents=True)
    entries = []
    for key, (phase, height, width) in images.items():
        ok, data = cv2.imencode(".jpg", np.full((height, width, 3), 127, dtype=np.uint8))
        assert ok
        (jpegs / f"{key}.jpg").write_bytes(data.tobytes())
        image_id = int(key.replace("_", ""))
        entries.append(
            {
                "image_id": image_id,
                "file_name": f"{key}.jpg",
                "height": height,
                "width": width,
                "phase": phase,
            }
        )
    content = {"images": entries, "categories": [], "parts": [], "annos_segmentation": annotations}
    (root / json_folder).mkdir(parents=True, exist_ok=True)
    (root / json_folder / DETAIL_JSON).write_text(json.dumps(content))
    return root


def _annotation(ann_id: int, key: str, category_id: int, segmentation: Any) -> dict[str, Any]:
    image_id = int(key.replace("_", ""))
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "segmentation": segmentation}


def _load(raw: Path, split: str, key: str) -> np.ndarray:
    sample = next(s for s in find_samples("pascal_context_59", raw, split) if s.key == key)
    return load_sample(sample).label


@pytest.fixture(scope="module")
def json_twin(tmp_path_factory: pytest.TempPathFactory) -> TwinReport:
    """A Pascal Context twin labelled by a ``trainval_merged.json`` (read-only)."""
    root = tmp_path_factory.mktemp("json_twin") / "pascal"
    return synthesize("pascal_context_59", root, label_format="detail_json", **TWIN)


@pytest.fixture(scope="module")
def mat_twin(tmp_path_factory: pytest.TempPathFactory) -> TwinReport:
    """The same twin (same seed and options) with PASCAL-Context ``.mat`` files: the generator's labels."""
    return synthesize("pascal_context_59", tmp_path_factory.mktemp("mat_twin") / "pascal", **TWIN)


@pytest.fixture(scope="module")
def json_prepared(json_twin: TwinReport, tmp_path_factory: pytest.TempPathFactory) -> PrepareReport:
    out = tmp_path_factory.mktemp("json_prepared") / "pascal"
    return prepare_dataset("pascal_context_59", json_twin.root, out, samples_per_shard=SAMPLES_PER_SHARD)


# ------------------------------------------------------------------------------------- run-length decoding
def test_rle_counts_are_column_major_runs_starting_with_zeros() -> None:
    mask = np.array([[0, 1, 1], [0, 1, 0]], dtype=bool)  # columns: (0, 0), (1, 1), (1, 0)
    assert decode_rle({"size": [2, 3], "counts": [2, 3, 1]}).tolist() == mask.tolist()
    assert encode_rle(mask) == {"size": [2, 3], "counts": "231"}
    assert decode_rle({"size": [2, 3], "counts": "231"}).tolist() == mask.tolist()
    starts_with_one = np.array([[1, 0], [1, 0]], dtype=bool)
    assert encode_rle(starts_with_one)["counts"] == encode_rle_string([0, 2, 2])


@pytest.mark.parametrize(
    ("text", "counts"),
    [
        ("231", [2, 3, 1]),
        ("0T3b1", [0, 100, 50]),  # 100 = 4 + 3 * 32 (two groups); 50 needs the sign bit's continuation
        ("1:1H", [1, 10, 1, 2]),  # the fourth count is stored as 2 - 10 = -8
        ("", []),
    ],
)
def test_compressed_rle_strings_decoded_by_hand(text: str, counts: list[int]) -> None:
    assert decode_rle_string(text) == counts
    assert encode_rle_string(counts) == text


def test_compressed_rle_of_a_hand_made_mask() -> None:
    flat = np.zeros(150, dtype=bool)
    flat[:100] = True  # column-major: the first 10 columns entirely
    mask = flat.reshape(15, 10).T
    assert mask[:, :10].all() and not mask[:, 10:].any()
    assert decode_rle({"size": [10, 15], "counts": "0T3b1"}).tolist() == mask.tolist()


@pytest.mark.parametrize(
    ("rle", "message"),
    [
        ({"size": [2, 3], "counts": [2, 3]}, "cover 5 pixels"),
        ({"size": [2, 3], "counts": "2~"}, "character"),
        ({"size": [2, 3], "counts": "2é"}, "non-ASCII"),
        ({"size": [2, 3], "counts": "2" + "o" * 12 + "0"}, "longer than"),
        ({"size": [2, 3], "counts": "2b"}, "middle of a value"),
        ({"size": [2], "counts": "231"}, "size"),
        ({"size": [2, 3], "counts": [2, -3, 7]}, "non-negative"),
    ],
)
def test_malformed_rle_is_an_error_naming_the_source(rle: dict[str, Any], message: str) -> None:
    with pytest.raises(DetailFormatError, match=f"somewhere.json.*{message}"):
        decode_rle(rle, source="somewhere.json")


# ------------------------------------------------------------------------------------------------ polygons
def test_polygons_fill_the_pixels_whose_centres_are_inside() -> None:
    rectangle = polygons_to_mask([[1, 1, 4, 1, 4, 3, 1, 3]], 5, 6, source="x")
    expected = np.zeros((5, 6), dtype=bool)
    expected[1:3, 1:4] = True  # pixel centres x in {1.5, 2.5, 3.5}, y in {1.5, 2.5} (as pycocotools does)
    assert rectangle.tolist() == expected.tolist()
    triangle = polygons_to_mask([[0, 0, 4.2, 0, 0, 4.2]], 4, 4, source="x")
    assert triangle.astype(int).tolist() == [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]]
    union = polygons_to_mask([[0, 0, 1, 0, 1, 1, 0, 1], [2, 2, 3, 2, 3, 3, 2, 3]], 3, 3, source="x")
    assert np.argwhere(union).tolist() == [[0, 0], [2, 2]]
    clipped = polygons_to_mask([[-2, -2, 2, -2, 2, 2, -2, 2]], 3, 3, source="x")
    assert np.argwhere(clipped).tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert decode_segmentation([[1, 1, 4, 1, 4, 3, 1, 3]], 5, 6, source="x").tolist() == expected.tolist()


def test_bad_polygons_and_segmentations_are_errors() -> None:
    with pytest.raises(DetailFormatError, match=r"img.*polygon"):
        polygons_to_mask([[0, 0, 1, 1, 2]], 3, 3, source="img")
    with pytest.raises(DetailFormatError, match=r"img.*segmentation must be"):
        decode_segmentation("nonsense", 3, 3, source="img")
    with pytest.raises(DetailFormatError, match=r"img.*\[2, 3\] differs from the image size \[3, 3\]"):
        decode_segmentation({"size": [2, 3], "counts": "231"}, 3, 3, source="img")


# ----------------------------------------------------------------------------- getMask: order and overlaps
def test_later_annotations_overwrite_earlier_ones_and_uncovered_pixels_stay_zero() -> None:
    key = "2008_000001"
    left = [[1, 1, 0, 0], [1, 1, 0, 0]]
    middle = [[0, 1, 1, 0], [0, 1, 1, 0]]
    images = [{"image_id": 2008000001, "file_name": f"{key}.jpg", "height": 2, "width": 4, "phase": "train"}]
    first, second = _annotation(1, key, 2, _rle(left)), _annotation(2, key, 9, _rle(middle))
    content = {"images": images, "annos_segmentation": [first, second]}
    label = parse_detail_json(json.dumps(content).encode(), source="j").label_map(key)
    assert label.tolist() == [[2, 9, 9, 0], [2, 9, 9, 0]]
    content["annos_segmentation"] = [second, first]
    label = parse_detail_json(json.dumps(content).encode(), source="j").label_map(key)
    assert label.tolist() == [[2, 2, 9, 0], [2, 2, 9, 0]]


def test_a_repeated_annotation_id_replaces_the_earlier_entry_in_its_place() -> None:
    # The Detail API indexes annotations by id: the third entry replaces the first, keeping the first's place,
    # so the second entry (category 9) is painted over it.
    key = "2008_000001"
    images = [{"image_id": 2008000001, "file_name": f"{key}.jpg", "height": 1, "width": 3, "phase": "val"}]
    annotations = [
        _annotation(7, key, 2, _rle([[1, 1, 1]])),
        _annotation(8, key, 9, _rle([[0, 1, 0]])),
        _annotation(7, key, 18, _rle([[1, 1, 0]])),
    ]
    content = {"images": images, "annos_segmentation": annotations}
    label = parse_detail_json(json.dumps(content).encode(), source="j").label_map(key)
    assert label.tolist() == [[18, 9, 0]]


def test_annotation_of_an_unknown_image_is_an_error() -> None:
    content = {"images": [], "annos_segmentation": [_annotation(1, "2008_000001", 2, _rle([[1]]))]}
    with pytest.raises(DetailFormatError, match=r"j: annotation 1 refers to image_id 2008000001"):
        parse_detail_json(json.dumps(content).encode(), source="j")
    with pytest.raises(DetailFormatError, match="j: not a readable JSON"):
        parse_detail_json(b"{nope", source="j")
    with pytest.raises(DetailFormatError, match="j: not a Detail API annotation file"):
        parse_detail_json(b'{"images": []}', source="j")


# --------------------------------------------------------------------------- the 59-class reduction, by hand
def test_hand_chosen_pixels(tmp_path: Path) -> None:
    key = "2008_000001"
    annotations = [
        _annotation(1, key, 2, _rle([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0], [0] * 6])),
        _annotation(2, key, 458, [[3, 0, 5, 0, 5, 2, 3, 2]]),  # polygon: rows 0-1, columns 3-4
        _annotation(3, key, 9, _rle([[0] * 6, [0] * 6, [0] * 6, [1, 1, 0, 0, 0, 0]])),
    ]
    raw = _write_raw(tmp_path / "raw", {key: ("train", 4, 6)}, annotations)
    label = _load(raw, "train", key)
    assert label[0, 0] == 0  # id 2 (aeroplane), the first kept class -> train id 0
    assert label[0, 3] == label[1, 4] == 58  # id 458, the last kept class -> train id 58
    assert label[2, 4] == 0  # id 2 where the polygon does not reach
    assert label[3, 0] == label[3, 1] == 1  # id 9 (bag) -> train id 1
    assert label[0, 5] == label[3, 5] == 255  # no annotation: background 0 -> ignored
    table = lookup_table("pascal_context_459")
    assert label[2, 0] == table[2] and label[3, 2] == table[0] == 255


def test_an_id_outside_the_kept_list_is_an_error_naming_file_and_image(tmp_path: Path) -> None:
    good, bad = "2008_000001", "2008_000002"
    annotations = [
        _annotation(1, good, 2, _rle([[1, 1], [1, 1]])),
        _annotation(2, bad, 2, _rle([[1, 1], [1, 1]])),
        _annotation(3, bad, 3, _rle([[0, 1], [0, 0]])),  # "air conditioner": not one of the 59 classes
    ]
    raw = _write_raw(tmp_path / "raw", {good: ("train", 2, 2), bad: ("train", 2, 2)}, annotations)
    assert _load(raw, "train", good).tolist() == [[0, 0], [0, 0]]
    with pytest.raises(LabelError, match=rf"{DETAIL_JSON} \(image {bad}\).*\[3\]"):
        _load(raw, "train", bad)
    with pytest.raises(LabelError, match=rf"{DETAIL_JSON} \(image {bad}\)"):
        prepare_dataset("pascal_context_59", raw, tmp_path / "out", splits=["train"])


def test_undecodable_annotation_is_a_corrupt_file_naming_the_image(tmp_path: Path) -> None:
    key = "2010_000001"
    annotations = [_annotation(1, key, 2, {"size": [3, 3], "counts": "9"})]  # a 3x3 mask on a 2x3 image
    raw = _write_raw(tmp_path / "raw", {key: ("val", 2, 3)}, annotations)
    with pytest.raises(CorruptFileError, match=rf"{DETAIL_JSON}: image {key}: segmentation size"):
        _load(raw, "val", key)
    report = prepare_dataset("pascal_context_59", raw, tmp_path / "out", splits=["val"], skip_corrupt=True)
    assert [s["key"] for s in report.index.splits["val"].skipped] == [key]


def test_unreadable_json_is_a_corrupt_file(tmp_path: Path) -> None:
    raw = _write_raw(tmp_path / "raw", {"2008_000001": ("train", 2, 2)}, [])
    (raw / VOC / DETAIL_JSON).write_text("{not json")
    with pytest.raises(CorruptFileError, match=rf"{DETAIL_JSON}: not a readable JSON"):
        find_samples("pascal_context_59", raw, "train")


# ------------------------------------------------------------------------- splits, locations, precedence
def test_splits_come_from_the_json_image_sets_unless_the_lists_exist(
    json_twin: TwinReport, tmp_path: Path
) -> None:
    assert [s.key for s in find_samples("pascal_context_59", json_twin.root, "train")] == [
        f"2008_{i:06d}" for i in range(1, 7)
    ]
    assert [s.key for s in find_samples("pascal_context_59", json_twin.root, "val")] == [
        f"2010_{i:06d}" for i in range(1, 6)
    ]
    raw = tmp_path / "raw"
    shutil.copytree(json_twin.root, raw)
    lists = raw / VOC / "ImageSets/SegmentationContext"
    lists.mkdir(parents=True)
    (lists / "val.txt").write_text("2010_000004\n2010_000002\n")
    assert [s.key for s in find_samples("pascal_context_59", raw, "val")] == ["2010_000002", "2010_000004"]


def test_json_beside_vocdevkit_is_found(json_twin: TwinReport, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    shutil.copytree(json_twin.root, raw)
    (raw / VOC / DETAIL_JSON).rename(raw / DETAIL_JSON)
    samples = find_samples("pascal_context_59", raw, "val")
    assert samples[0].label.describe() == str(raw / DETAIL_JSON)
    expected = _load(json_twin.root, "val", "2010_000003")
    np.testing.assert_array_equal(_load(raw, "val", "2010_000003"), expected)


def test_json_takes_precedence_over_mat_files(
    json_twin: TwinReport, mat_twin: TwinReport, tmp_path: Path
) -> None:
    raw = tmp_path / "raw"
    shutil.copytree(json_twin.root, raw)
    shutil.copytree(mat_twin.root / "trainval", raw / "trainval")
    shutil.copytree(mat_twin.root / VOC / "ImageSets", raw / VOC / "ImageSets")
    samples = find_samples("pascal_context_59", raw, "train")
    assert {s.label.name for s in samples} == {DETAIL_JSON}
    assert {s.encoding for s in samples} == {"pascal_context_459"}
    (raw / VOC / DETAIL_JSON).unlink()
    assert {Path(s.label.name).suffix for s in find_samples("pascal_context_59", raw, "train")} == {".mat"}


def test_missing_annotations_name_the_json(json_twin: TwinReport, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    shutil.copytree(json_twin.root / "VOCdevkit", raw / "VOCdevkit")
    (raw / VOC / DETAIL_JSON).unlink()
    with pytest.raises(DatasetNotFoundError, match=rf"{DETAIL_JSON}.*{VOC}/"):
        find_samples("pascal_context_59", raw, "train")


# ----------------------------------------------------------------------------------------------- the twin
def test_json_twin_layout_and_format(json_twin: TwinReport) -> None:
    root = json_twin.root
    assert not (root / "trainval").exists() and not (root / VOC / "ImageSets").exists()
    content = json.loads((root / VOC / DETAIL_JSON).read_text())
    assert set(content) >= {"images", "annos_segmentation", "categories", "parts", "annos_occlusion"}
    assert content["images"][0] == {
        "image_id": 2008000001,
        "file_name": "2008_000001.jpg",
        **{k: content["images"][0][k] for k in ("height", "width")},
        "phase": "train",
    }
    assert [i["phase"] for i in content["images"]] == ["train"] * 6 + ["val"] * 5
    assert len(content["categories"]) == 59
    annotation = content["annos_segmentation"][0]
    assert set(annotation) >= {"id", "image_id", "category_id", "segmentation", "area", "bbox", "iscrowd"}
    assert isinstance(annotation["segmentation"]["counts"], str)
    assert decode_rle(annotation["segmentation"]).sum() == annotation["area"]
    ids = [a["category_id"] for a in content["annos_segmentation"]]
    assert set(ids) <= {2, 9, 18, 19, 22, 23}  # the kept ids of train ids 0..5
    per_image: dict[int, int] = {}
    for a in content["annos_segmentation"]:
        per_image[a["image_id"]] = per_image.get(a["image_id"], 0) + 1
    assert max(per_image.values()) > 1  # layered scenes: overlapping annotations


def test_json_twin_is_deterministic_by_seed(tmp_path: Path) -> None:
    options = {"num_train": 2, "num_val": 1, "min_size": 24, "max_size": 40, "label_format": "detail_json"}
    first = synthesize("pascal_context_59", tmp_path / "a", seed=5, **options).root / VOC / DETAIL_JSON
    again = synthesize("pascal_context_59", tmp_path / "b", seed=5, **options).root / VOC / DETAIL_JSON
    other = synthesize("pascal_context_59", tmp_path / "c", seed=6, **options).root / VOC / DETAIL_JSON
    assert first.read_bytes() == again.read_bytes() != other.read_bytes()
    with pytest.raises(ValueError, match="pascal_context_59 only"):
        synthesize("ade20k", tmp_path / "d", **options)
    with pytest.raises(ValueError, match="label_format"):
        synthesize("pascal_context_59", tmp_path / "e", **{**options, "label_format": "png"})


def test_round_trip_json_twin_to_shards_equals_the_generator_labels(
    json_twin: TwinReport, json_prepared: PrepareReport, mat_twin: TwinReport
) -> None:
    # The same seed and options give the same scenes in both formats: the .mat twin holds the generator's
    # label maps (as 459-class ids) and the same JPEGs.
    table = lookup_table("pascal_context_459")
    ignored = 0
    for split in SPLITS:
        records = _records(json_prepared.root, split)
        assert sorted(records) == [s.key for s in find_samples("pascal_context_59", mat_twin.root, split)]
        assert len(records) == json_twin.counts[split]
        for key, (image_bytes, label, meta) in records.items():
            mat = mat_twin.root / "trainval" / f"{key}.mat"
            generated = table[decode_label_mat(mat.read_bytes(), source=str(mat))].astype(np.uint8)
            np.testing.assert_array_equal(label, generated, err_msg=key)
            assert image_bytes == (json_twin.root / VOC / "JPEGImages" / f"{key}.jpg").read_bytes()
            assert image_bytes == (mat_twin.root / VOC / "JPEGImages" / f"{key}.jpg").read_bytes()
            assert meta["label_file"] == DETAIL_JSON and meta["label_encoding"] == "pascal_context_459"
            ignored += int((label == 255).sum())
    assert ignored > 0  # unlabelled regions (no annotation) became ignore


def test_synthesize_command_writes_the_json_twin(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser(prog="vitadapter")
    data_command.register(parser.add_subparsers(dest="command"))
    twin = tmp_path / "twin"
    argv = [
        "data",
        "synthesize",
        "pascal_context_59",
        "--out",
        str(twin),
        "--num-train",
        "2",
        "--num-val",
        "1",
    ]
    argv += ["--min-size", "24", "--max-size", "32", "--label-format", "detail_json"]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    assert (twin / VOC / DETAIL_JSON).is_file() and not (twin / "trainval").exists()
