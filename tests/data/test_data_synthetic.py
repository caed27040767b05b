"""Synthetic twins: official naming and encodings, determinism, class restriction, distinct class looks."""

from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from data.catalog import get_dataset, lookup_table
from data.readers import decode_label_image, decode_label_mat
from data.synthetic import class_appearance, make_scene, synthesize

EXPECTED_FILES = {
    "ade20k": [
        "ADEChallengeData2016/images/training/ADE_train_00000001.jpg",
        "ADEChallengeData2016/annotations/training/ADE_train_00000001.png",
        "ADEChallengeData2016/images/validation/ADE_val_00000002.jpg",
        "ADEChallengeData2016/annotations/validation/ADE_val_00000002.png",
    ],
    "coco_stuff164k": [
        "images/train2017/000000000001.jpg",
        "annotations/train2017/000000000001.png",
        "images/val2017/000000500001.jpg",
        "annotations/val2017/000000500001.png",
    ],
    "pascal_context_59": [
        "VOCdevkit/VOC2010/JPEGImages/2008_000001.jpg",
        "trainval/2008_000001.mat",
        "VOCdevkit/VOC2010/ImageSets/SegmentationContext/train.txt",
        "VOCdevkit/VOC2010/ImageSets/SegmentationContext/val.txt",
    ],
}


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _raw_labels(dataset: str, root: Path) -> list[np.ndarray]:
    if dataset == "pascal_context_59":
        return [decode_label_mat(p.read_bytes(), source=str(p)) for p in sorted(root.rglob("*.mat"))]
    return [decode_label_image(p.read_bytes(), source=str(p)) for p in sorted(root.rglob("*.png"))]


@pytest.mark.parametrize("dataset", ["ade20k", "coco_stuff164k", "pascal_context_59"])
def test_twin_layout_and_raw_encoding(twins: dict, dataset: str) -> None:
    root = twins[dataset].root
    for name in EXPECTED_FILES[dataset]:
        assert (root / name).is_file(), name
    assert len(list(root.rglob("*.jpg"))) == 11
    table = lookup_table(get_dataset(dataset).raw_encoding)
    labels = _raw_labels(dataset, root)
    assert len(labels) == 11
    seen_train_ids: set[int] = set()
    for raw in labels:
        assert raw.dtype == (np.uint16 if dataset == "pascal_context_59" else np.uint8)
        converted = table[raw]
        assert (converted >= 0).all(), "a raw id outside the official encoding"
        seen_train_ids |= set(np.unique(converted).tolist())
    # num_classes_used=6 in the fixture: only train ids 0..5 and ignore appear, and ignore does appear.
    assert seen_train_ids <= {0, 1, 2, 3, 4, 5, 255} and 255 in seen_train_ids and len(seen_train_ids) >= 4


def test_pascal_split_lists_name_the_images(twins: dict) -> None:
    root = twins["pascal_context_59"].root / "VOCdevkit/VOC2010"
    train = (root / "ImageSets/SegmentationContext/train.txt").read_text().split()
    val = (root / "ImageSets/SegmentationContext/val.txt").read_text().split()
    assert len(train) == 6 and len(val) == 5 and not set(train) & set(val)
    assert all((root / "JPEGImages" / f"{i}.jpg").is_file() for i in train + val)


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    options = {"num_train": 2, "num_val": 1, "min_size": 32, "max_size": 48}
    first = synthesize("pascal_context_59", tmp_path / "a", seed=7, **options).root
    again = synthesize("pascal_context_59", tmp_path / "b", seed=7, **options).root
    other = synthesize("pascal_context_59", tmp_path / "c", seed=8, **options).root
    assert _tree_digest(first) == _tree_digest(again)
    assert _tree_digest(first) != _tree_digest(other)


def test_class_subset_is_respected(tmp_path: Path) -> None:
    root = synthesize(
        "coco_stuff164k", tmp_path / "t", num_train=3, num_val=1, min_size=32, max_size=40, classes=[11, 170]
    ).root
    values = set()
    for raw in _raw_labels("coco_stuff164k", root):
        values |= set(np.unique(raw).tolist())
    assert values <= {12, 181, 255}  # raw ids of train ids 11 and 170, and unlabeled
    with pytest.raises(ValueError, match="171"):
        synthesize("coco_stuff164k", tmp_path / "bad", classes=[171])


def test_classes_look_different_and_scenes_have_regions() -> None:
    looks = [class_appearance(c) for c in range(12)]
    colours = np.array([look.colour for look in looks])
    distances = np.linalg.norm(colours[:, None] - colours[None, :], axis=-1)
    assert distances[~np.eye(12, dtype=bool)].min() > 10  # distinct colours
    image, label = make_scene(64, 80, [0, 1, 2, 3], np.random.default_rng(0))
    assert image.shape == (64, 80, 3) and label.shape == (64, 80)
    present = [c for c in np.unique(label).tolist() if c != 255]
    assert len(present) >= 2
    # each class region has roughly its class colour (mean over the region; texture averages out)
    for class_id in present:
        mask = cv2.erode((label == class_id).astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        if mask.sum() > 50:
            mean = image[mask].mean(axis=0)
            assert np.abs(mean - np.array(class_appearance(class_id).colour)).max() < 20
