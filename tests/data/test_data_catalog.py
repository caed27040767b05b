"""Catalog facts and label conventions, checked on hand-chosen pixels (docs/reference.md §D)."""

from __future__ import annotations

import numpy as np
import pytest

from data.catalog import (
    CATALOG,
    COCO_STUFF_UNUSED_IDS,
    DATASET_NAMES,
    IGNORE_INDEX,
    PASCAL_CONTEXT_KEPT_IDS,
    LabelError,
    check_train_ids,
    get_dataset,
    make_palette,
    raw_ids_of_train_ids,
    to_train_ids,
)
from pipelines.commands import data as data_command


def _convert(values: list[int], encoding: str, dtype: type = np.uint8) -> list[int]:
    raw = np.array([values], dtype=dtype)
    return to_train_ids(raw, encoding, source="hand.png")[0].tolist()


def test_split_sizes_and_class_counts() -> None:
    assert get_dataset("ade20k").split_sizes == {"train": 20210, "val": 2000}
    assert get_dataset("coco_stuff164k").split_sizes == {"train": 118287, "val": 5000}
    assert get_dataset("pascal_context_59").split_sizes == {"train": 4996, "val": 5104}
    assert [CATALOG[n].num_classes for n in DATASET_NAMES] == [150, 171, 59]


def test_class_names_spot_checks() -> None:
    ade, coco, pascal = (get_dataset(n).class_names for n in DATASET_NAMES)
    assert (ade[0], ade[7], ade[149]) == ("wall", "bed ", "flag")
    assert (coco[0], coco[11], coco[80], coco[170]) == ("person", "stop sign", "banner", "wood")
    assert (pascal[0], pascal[58]) == ("aeroplane", "wood")


def test_ade20k_convention() -> None:
    assert _convert([0, 1, 2, 150], "ade20k_raw") == [255, 0, 1, 149]
    with pytest.raises(LabelError, match=r"hand\.png.*151"):
        _convert([1, 151], "ade20k_raw")


def test_coco_stuff_convention() -> None:
    raw = [0, 10, 12, 26, 30, 45, 66, 69, 71, 83, 91, 181, 255]
    assert _convert(raw, "coco_stuff_raw") == [0, 10, 11, 24, 26, 40, 60, 61, 62, 73, 80, 170, 255]
    assert len(COCO_STUFF_UNUSED_IDS) == 11
    for bad in (11, 90, 182, 254):
        with pytest.raises(LabelError, match=r"hand\.png"):
            _convert([0, bad], "coco_stuff_raw")
    assert _convert([0, 170, 255], "coco_stuff_train_ids") == [0, 170, 255]
    with pytest.raises(LabelError):
        _convert([171], "coco_stuff_train_ids")


def test_pascal_context_convention() -> None:
    assert len(PASCAL_CONTEXT_KEPT_IDS) == 60 and list(PASCAL_CONTEXT_KEPT_IDS) == sorted(
        PASCAL_CONTEXT_KEPT_IDS
    )
    # background -> ignore; aeroplane (459-id 2) -> 0; bag (9) -> 1; wood (458) -> 58
    assert _convert([0, 2, 9, 458], "pascal_context_459", np.uint16) == [255, 0, 1, 58]
    for bad in (1, 3, 459, 460):
        with pytest.raises(LabelError, match=r"hand\.png"):
            _convert([0, bad], "pascal_context_459", np.uint16)
    assert _convert([0, 1, 59], "pascal_context_59") == [255, 0, 58]
    with pytest.raises(LabelError):
        _convert([60], "pascal_context_59")


def test_raw_ids_invert_the_conventions() -> None:
    for name in DATASET_NAMES:
        info = get_dataset(name)
        train_ids = [*range(info.num_classes), IGNORE_INDEX]
        raw = raw_ids_of_train_ids(info.raw_encoding, train_ids)
        dtype = np.uint16 if name == "pascal_context_59" else np.uint8
        assert _convert(raw, info.raw_encoding, dtype) == train_ids


def test_check_train_ids_names_the_file() -> None:
    check_train_ids(np.array([[0, 58, 255]], dtype=np.uint8), 59, source="ok.png")
    with pytest.raises(LabelError, match=r"bad\.png.*59"):
        check_train_ids(np.array([[0, 59, 255]], dtype=np.uint8), 59, source="bad.png")


def test_palette_and_errors() -> None:
    palette = make_palette(171)
    assert palette.shape == (171, 3) and palette.dtype == np.uint8
    assert len({tuple(c) for c in palette.tolist()}) == 171
    with pytest.raises(ValueError, match="known datasets"):
        get_dataset("cityscapes")


def test_command_line_names_match_the_catalog() -> None:
    assert data_command.DATASETS == DATASET_NAMES
