"""Dataset cards: strict checks naming the key, the label rules and the mistakes they catch (each by file,
value and pixel count), the three source kinds (folders, list files, parquet), and `data init`'s guesses."""

from __future__ import annotations

import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from PIL import Image

from data.card_init import card_text, scan_folder
from data.cards import CardError, load_card
from data.catalog import LabelError, get_dataset
from data.prepare_card import UnpairedFilesError, prepare_card
from data.readers import CorruptFileError

CLASSES = ["background", "ham", "olive"]


def _pair(images: Path, labels: Path, stem: str, label: np.ndarray, *, mode: str = "L") -> None:
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    height, width = label.shape[:2]
    image = np.full((height, width, 3), 100, dtype=np.uint8)
    cv2.imwrite(str(images / f"{stem}.png"), image)
    Image.fromarray(label, mode=mode).save(labels / f"{stem}.png")


def _card(root: Path, **changes: object) -> Path:
    body = {
        "name": "toppings",
        "classes": CLASSES,
        "labels": "train_ids",
        "image_suffix": ".png",
        "splits": {
            "train": {"images": "img/train", "labels": "ann/train"},
            "val": {"images": "img/val", "labels": "ann/val"},
        },
        **changes,
    }
    path = root / "card.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def _folders(root: Path, label: np.ndarray, *, mode: str = "L") -> None:
    for split in ("train", "val"):
        _pair(root / "img" / split, root / "ann" / split, f"{split}_a", label, mode=mode)


LABEL = np.array([[0, 0, 1, 1], [2, 2, 0, 255]], dtype=np.uint8)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"colour": "red"}, r"card\.yaml: colour: unknown key"),
        ({"classes": ["a", "b", "a"]}, r"classes\[2\]: duplicate class name 'a' \(also classes\[0\]\)"),
        ({"palette": [[0, 0, 0], [1, 2, 3]]}, r"palette: 2 colours for 3 classes"),
        (
            {"palette": [[0, 0, 0], [1, 2, 3], [300, 0, 0]]},
            r"palette\[2\]: \[300, 0, 0\] is not an RGB colour",
        ),
        ({"name": "ade20k"}, r"'ade20k' is a built-in dataset"),
        ({"name": "my data"}, r"'my data' is not a plain dataset name"),
        ({"labels": "reduce_zero"}, r"labels: 'reduce_zero': expected train_ids, reduce_zero_label or a map"),
        (
            {"labels": {0: "background", 1: "ham", 2: "tomato"}},
            r"labels\.2: 'tomato' is neither one of the classes",
        ),
        ({"labels": {0: "background", 1: "ham"}}, r"labels: no raw value maps to the class\(es\) 'olive'"),
        ({"ignore_index": 1}, r"ignore_index: 1 is also a class value under labels: train_ids"),
        (
            {
                "splits": {
                    "train": {"images": "img/train", "labels": "nowhere"},
                    "val": {"images": "img/val", "labels": "ann/val"},
                }
            },
            r"splits\.train\.labels: no such folder .*nowhere",
        ),
        ({"splits": {"train": {"images": "img/train", "labels": "ann/train"}}}, r"splits\.val: missing"),
        (
            {
                "splits": {
                    "train": {"parquet": "data/*.parquet"},
                    "val": {"images": "img/val", "labels": "ann/val"},
                }
            },
            r"splits\.train\.parquet: no file matches",
        ),
    ],
)
def test_a_card_is_checked_strictly_naming_the_key_or_path(
    tmp_path: Path, changes: dict, message: str
) -> None:
    _folders(tmp_path, LABEL)
    with pytest.raises(CardError, match=message):
        load_card(_card(tmp_path, **changes))


def test_train_ids_and_the_mistakes_named_by_file_value_and_pixel_count(tmp_path: Path) -> None:
    _folders(tmp_path, LABEL)
    out = tmp_path / "out"
    report = prepare_card(_card(tmp_path), out)
    assert (
        report.index.splits["train"].class_pixels == [3, 2, 2]
        and report.index.splits["train"].ignore_pixels == 1
    )
    assert get_dataset("toppings").class_names == tuple(CLASSES)  # registered: downstream finds its classes
    # values 1..3 with 3 classes: the reduce_zero_label mistake
    shifted = (LABEL.astype(int) + 1).clip(max=255).astype(np.uint8)
    _pair(tmp_path / "img" / "train", tmp_path / "ann" / "train", "train_a", shifted)
    with pytest.raises(
        LabelError,
        match=r"ann/train/train_a\.png: label value 3 \(2 pixels\) not mapped.*did you mean reduce_zero_label",
    ):
        prepare_card(_card(tmp_path), tmp_path / "out2")
    # the same files with the right rule
    reduced = prepare_card(_card(tmp_path, labels="reduce_zero_label", ignore_index=255), tmp_path / "out3")
    assert reduced.index.splits["train"].class_pixels == [3, 2, 2]
    assert reduced.index.splits["train"].ignore_pixels == 1
    assert "reduce_zero_label" in reduced.index.label_convention


def test_rgb_masks_need_an_rgb_map(tmp_path: Path) -> None:
    colours = {(0, 0, 0): 0, (220, 20, 60): 1, (0, 128, 0): 2}
    rgb = np.zeros((*LABEL.shape, 3), dtype=np.uint8)
    for colour, value in colours.items():
        rgb[value == LABEL] = colour
    rgb[LABEL == 255] = (255, 255, 255)
    _folders(tmp_path, rgb, mode="RGB")
    with pytest.raises(
        LabelError, match=r"ann/train/train_a\.png: an RGB label map .* labels rule is train_ids"
    ):
        prepare_card(_card(tmp_path), tmp_path / "out")
    rgb_map = {"0,0,0": "background", "220,20,60": "ham", "0,128,0": "olive"}
    with pytest.raises(LabelError, match=r"colours \(255,255,255\) \(1 pixels\) not mapped"):
        prepare_card(_card(tmp_path, labels=rgb_map), tmp_path / "out")
    report = prepare_card(_card(tmp_path, labels={**rgb_map, "255,255,255": "ignore"}), tmp_path / "out")
    assert (
        report.index.splits["val"].class_pixels == [3, 2, 2] and report.index.splits["val"].ignore_pixels == 1
    )


def test_size_mismatch_unpaired_files_and_a_split_without_a_pair(tmp_path: Path) -> None:
    _folders(tmp_path, LABEL)
    cv2.imwrite(str(tmp_path / "img" / "val" / "val_a.png"), np.zeros((3, 4, 3), dtype=np.uint8))
    with pytest.raises(
        CorruptFileError, match=r"ann/val/val_a\.png: label map size 4x2 \(WxH\) differs from the image's 4x3"
    ):
        prepare_card(_card(tmp_path), tmp_path / "out")
    _folders(tmp_path, LABEL)
    _pair(tmp_path / "img" / "train", tmp_path / "elsewhere", "lonely", LABEL)
    with pytest.raises(UnpairedFilesError, match=r"train: 1 image without a label \(lonely\.png\)"):
        prepare_card(_card(tmp_path), tmp_path / "out")
    report = prepare_card(_card(tmp_path), tmp_path / "out", skip_unpaired=True)
    assert report.index.splits["train"].skipped[0]["file"] == "lonely.png"
    (tmp_path / "ann" / "val" / "val_a.png").unlink()
    with pytest.raises(UnpairedFilesError, match=r"splits\.val: no image-label pair"):
        prepare_card(_card(tmp_path), tmp_path / "out", skip_unpaired=True)


def _png(array: np.ndarray, mode: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def test_parquet_files_with_encoded_images_and_a_list_split(tmp_path: Path) -> None:
    """The Hugging Face Hub's layout: an image column of bytes and a label column of {bytes, path} structs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    image = _png(np.full((*LABEL.shape, 3), 90, dtype=np.uint8), "RGB")
    table = pa.table(
        {
            "image": pa.array([image, image], type=pa.binary()),
            "annotation": [
                {"bytes": _png(LABEL, "L"), "path": "a.png"},
                {"bytes": _png(LABEL, "L"), "path": "b.png"},
            ],
        }
    )
    (tmp_path / "data").mkdir()
    pq.write_table(table, tmp_path / "data" / "train-00000-of-00001.parquet", row_group_size=1)
    _pair(tmp_path / "img", tmp_path / "ann", "v1", LABEL)
    _pair(tmp_path / "img", tmp_path / "ann", "v2", LABEL)
    (tmp_path / "val.txt").write_text("v2  # the second one only\n")
    splits = {
        "train": {"parquet": "data/train-*.parquet", "image": "image", "label": "annotation"},
        "val": {"list": "val.txt", "images": "img", "labels": "ann"},
    }
    report = prepare_card(_card(tmp_path, splits=splits), tmp_path / "out")
    assert report.index.splits["train"].num_samples == 2 and report.index.splits["val"].num_samples == 1
    assert report.index.splits["train"].class_pixels == [6, 4, 4]
    wrong = {**splits, "train": {**splits["train"], "label": "mask"}}
    with pytest.raises(CorruptFileError, match=r"no column 'mask' \(its columns: image, annotation\)"):
        prepare_card(_card(tmp_path, splits=wrong), tmp_path / "out2")


def test_init_on_the_mmsegmentation_layout_guesses_reduce_zero_label(tmp_path: Path) -> None:
    root = tmp_path / "mine"
    for split in ("train", "val"):
        _pair(
            root / "img_dir" / split,
            root / "ann_dir" / split,
            f"{split}_a",
            np.array([[1, 2], [3, 1]], dtype=np.uint8),
        )
    draft = scan_folder(root, progress=False)
    assert (
        draft.layout == "mmsegmentation" and draft.labels == "reduce_zero_label" and len(draft.classes) == 3
    )
    assert any("no pixel is 0" in reason for reason in draft.reasons)
    text, lists = card_text(draft, tmp_path / "mine.yaml", name="mine")
    assert not lists
    card = tmp_path / "mine.yaml"
    card.write_text(text)
    assert load_card(card).rule.kind == "reduce_zero_label"


def test_init_makes_a_split_of_a_flat_folder_as_list_files(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    for index in range(5):
        _pair(root / "images", root / "masks", f"p{index}", LABEL)
    draft = scan_folder(root, val_fraction=0.2, progress=False)
    assert draft.layout.startswith("flat") and len(draft.splits["val"].pairs) == 1
    assert draft.labels == "train_ids" and draft.classes == ["class_0", "class_1", "class_2"]
    card = tmp_path / "flat.yaml"
    text, lists = card_text(draft, card, name="flat")
    card.write_text(text)
    for path, listing in lists.items():
        path.write_text(listing)
    loaded = load_card(card)
    report = prepare_card(loaded, tmp_path / "out")
    assert (report.index.splits["train"].num_samples, report.index.splits["val"].num_samples) == (4, 1)
    assert json.loads((tmp_path / "out" / "index.json").read_text())["card"]["sha256"] == loaded.sha256
