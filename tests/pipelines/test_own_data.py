"""Your own data, end to end with the real commands: a folder in the ADE20K layout becomes a dataset card
(`data init`), its label mistakes are errors naming them (`data prepare --card`), its shards fine-tune the tiny
preset from an ADE20K-twin checkpoint (`train --init-from`), which is evaluated single- and multi-scale and
predicts with the card's palette."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from micro_params import TINY_UPERNET_OVERRIDES, cli_model_args
from own_data import CLASSES, write_ade_layout
from pipelines.cli import main

ENTRY = "upernet_deit_adapter_tiny_512_160k_ade20k"
PALETTE = [[10, 10, 10], [220, 20, 60], [0, 128, 0]]
CLASS_LAYERS = [
    "decode_head.conv_seg.weight",
    "decode_head.conv_seg.bias",
    "auxiliary_head.conv_seg.weight",
    "auxiliary_head.conv_seg.bias",
]
TRAIN_ARGS = [
    "--max-iters", "2", "--batch-size", "2", "--global-batch", "2", "--eval-interval", "2",
    "--checkpoint-interval", "2", "--log-interval", "1", "--pretrained", "none", "--num-workers", "0",
    "--eval-limit", "1", "--device", "cpu", "--no-progress", "--no-tracking",
]  # fmt: skip


def _error(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelname == "ERROR")


def _ade_twin_checkpoint(root: Path) -> Path:
    """The tiny preset trained two iterations on a synthetic ADE20K twin: an ADE20K model (150 classes)."""
    twin, shards = root / "ade_twin", root / "ade_shards"
    assert main(["data", "synthesize", "ade20k", "--out", str(twin), "--num-train", "2", "--num-val", "1",
                 "--min-size", "64", "--max-size", "64", "--num-classes-used", "3"]) == 0  # fmt: skip
    assert main(["data", "prepare", "ade20k", "--raw", str(twin), "--out", str(shards)]) == 0
    work = root / "ade_run"
    args = ["train", ENTRY, "--data", str(shards), "--work-dir", str(work), "--init-from", "none"]
    assert main([*args, *cli_model_args(TINY_UPERNET_OVERRIDES), *TRAIN_ARGS]) == 0
    return work / "iter_0000002.pth"


def test_a_folder_becomes_a_card_shards_a_fine_tuned_model_its_evaluation_and_predictions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    own = write_ade_layout(tmp_path / "toppings", size=(48, 64))
    card = tmp_path / "toppings.yaml"

    # data init: what it found, and a card with a guessed rule and placeholder names
    assert main(["data", "init", str(own.root), "--out", str(card), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    for expected in (
        "ADE20K layout",
        "train: 6 pairs",
        "1 image without a label map: no_label.jpg",
        "val: 3 pairs",
        "1 label map without an image: no_image.png",
        "label modes: L 9",
        "labels guessed: train_ids",
        "value 0 covers",
        f"value 7: {own.bad_pixels} pixels",
        "annotations/training/train_001.png",
    ):
        assert expected in printed, expected
    written = yaml.safe_load(card.read_text())
    assert written["labels"] == "train_ids" and written["classes"] == ["class_0", "class_1", "class_2"]
    assert written["splits"]["train"] == {
        "images": "toppings/images/training",
        "labels": "toppings/annotations/training",
    }
    assert main(["data", "init", str(own.root), "--out", str(card)]) == 1  # never replaces a file
    assert "refusing to replace it" in _error(caplog)

    # the user names the classes and colours them
    written.update(classes=list(CLASSES), palette=PALETTE)
    card.write_text(yaml.safe_dump(written, sort_keys=False))
    shards = tmp_path / "shards"

    # files without a partner are an error naming them
    caplog.clear()
    assert main(["data", "prepare", "--card", str(card), "--out", str(shards)]) == 1
    message = _error(caplog)
    assert (
        "1 image without a label (no_label.jpg)" in message
        and "1 label without an image (no_image.png)" in message
    )
    assert "--skip-unpaired" in message and not shards.exists()

    # the stray value is an error naming the file, the value and its pixel count
    caplog.clear()
    assert main(["data", "prepare", "--card", str(card), "--out", str(shards), "--skip-unpaired"]) == 1
    message = _error(caplog)
    assert str(own.bad_label) in message and f"label value 7 ({own.bad_pixels} pixels) not mapped" in message
    assert "labels: train_ids takes 0..2 as the 3 classes" in message and not shards.exists()

    # the user ignores it; the unpaired files are skipped and recorded
    written["ignore_index"] = [255, 7]
    card.write_text(yaml.safe_dump(written, sort_keys=False))
    assert main(["data", "prepare", "--card", str(card), "--out", str(shards), "--skip-unpaired"]) == 0
    index = json.loads((shards / "index.json").read_text())
    assert (
        index["dataset"] == "toppings" and index["num_classes"] == 3 and index["class_names"] == list(CLASSES)
    )
    assert index["card"]["sha256"] == hashlib.sha256(card.read_bytes()).hexdigest()
    assert index["source"]["kind"] == "own"
    assert [s["file"] for s in index["splits"]["train"]["skipped"]] == ["no_label.jpg"]
    assert [s["file"] for s in index["splits"]["val"]["skipped"]] == ["no_image.png"]
    assert (index["splits"]["train"]["num_samples"], index["splits"]["val"]["num_samples"]) == (6, 3)

    # fine-tuning from an ADE20K model: the class layers start fresh, named in the key report
    ade = _ade_twin_checkpoint(tmp_path)
    work = tmp_path / "runs" / "toppings"
    caplog.clear()
    args = ["train", ENTRY, "--data", str(shards), "--work-dir", str(work), "--init-from", str(ade)]
    assert main([*args, *cli_model_args(TINY_UPERNET_OVERRIDES), *TRAIN_ARGS]) == 0
    keys = json.loads((work / "key_report.json").read_text())
    assert keys["init_from"]["reinitialised"] == CLASS_LAYERS
    assert keys["init_from"]["missing"] == [] and keys["init_from"]["unexpected"] == []
    ade_state = torch.load(ade, map_location="cpu", weights_only=True)["state_dict"]
    assert len(keys["init_from"]["loaded"]) == len(ade_state) - len(CLASS_LAYERS)
    assert "re-initialised (3 classes" in caplog.text and "decode_head.conv_seg.weight" in caplog.text
    diff = (work / "recipe_diff.json").read_text()
    assert "toppings (3 classes, own data)" in diff and "no published row" in diff
    checkpoint = work / "iter_0000002.pth"
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert state["overrides"]["num_classes"] == 3 and state["dataset"]["class_names"] == list(CLASSES)
    assert state["state_dict"]["decode_head.conv_seg.weight"].shape[0] == 3
    capsys.readouterr()

    # evaluated single- and multi-scale (one image: twelve views of it): the card's names, no published row
    for mode, count in (("ss", 3), ("ms", 1)):
        out = tmp_path / f"{mode}.json"
        extra = ["--show-dir", str(tmp_path / "show")] if mode == "ss" else ["--limit", "1"]
        assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(shards), "--mode", mode,
                     "--out", str(out), "--no-progress", "--no-tracking", *extra]) == 0  # fmt: skip
        result = json.loads(out.read_text())
        assert result["mode"] == mode and result["num_images"] == count
        assert result["per_class"]["name"] == list(CLASSES)
        assert result["published"] == "no published row" and result["published_miou"] is None
        assert 0 <= result["mIoU"] <= 100
        header = out.with_suffix(".confusion.csv").read_text().splitlines()[0]
        assert header == "label \\ predicted,background,ham,olive"
    table = capsys.readouterr().err
    assert "background" in table and "olive" in table
    assert sorted(p.name for p in (tmp_path / "show").glob("*.png")) == [
        "val_000.png",
        "val_001.png",
        "val_002.png",
    ]

    # predictions: class-index maps, overlays with a legend in the card's palette
    image = own.root / "images" / "validation" / "val_000.jpg"
    assert (
        main(["predict", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "pred"), str(image)]) == 0
    )
    pred = cv2.imread(str(tmp_path / "pred" / "val_000.png"), cv2.IMREAD_UNCHANGED)
    overlay = cv2.imread(str(tmp_path / "pred" / "val_000_overlay.png"))
    legend = overlay[:, pred.shape[1] :].reshape(-1, 3)
    colours = {tuple(c) for c in legend.tolist()}
    present = np.unique(pred).tolist()
    assert set(present) <= {0, 1, 2}
    for class_id in present:
        assert tuple(PALETTE[class_id][::-1]) in colours, class_id  # BGR swatch of the card's colour


@pytest.mark.slow
def test_the_export_and_the_mlflow_model_carry_the_card_classes_and_palette(tmp_path: Path) -> None:
    """ONNX metadata and the MLflow pyfunc's metadata name and colour the card's classes; both rebuild the
    card's model from their own files (the ONNX export predicts with the card's palette, the pyfunc gives
    `vitadapter predict`'s map)."""
    import mlflow
    import onnx

    from data.prepare_card import prepare_card
    from pipelines.reporting.mlflow_model import save_segmentation_model
    from pipelines.runs.inputs import model_from_checkpoint

    own = write_ade_layout(tmp_path / "toppings", num_train=2, num_val=1)
    card = tmp_path / "toppings.yaml"
    splits = {
        s: {"images": f"toppings/images/{f}", "labels": f"toppings/annotations/{f}"}
        for s, f in (("train", "training"), ("val", "validation"))
    }
    card.write_text(
        yaml.safe_dump(
            {
                "name": "toppings",
                "classes": list(CLASSES),
                "palette": PALETTE,
                "ignore_index": [255, 7],
                "splits": splits,
            }
        )
    )
    prepare_card(card, tmp_path / "shards", skip_unpaired=True)
    work = tmp_path / "run"
    args = [
        "train",
        ENTRY,
        "--data",
        str(tmp_path / "shards"),
        "--work-dir",
        str(work),
        "--init-from",
        "none",
    ]
    assert main([*args, *cli_model_args(TINY_UPERNET_OVERRIDES), *TRAIN_ARGS]) == 0
    checkpoint = work / "iter_0000002.pth"

    exported = tmp_path / "model.onnx"
    assert main(["export", "onnx", "--checkpoint", str(checkpoint), "--out", str(exported)]) == 0
    meta = {p.key: p.value for p in onnx.load(str(exported), load_external_data=False).metadata_props}
    assert json.loads(meta["vitadapter.class_names"]) == list(CLASSES)
    assert json.loads(meta["vitadapter.palette"]) == PALETTE
    assert json.loads(meta["vitadapter.dataset"])["name"] == "toppings"
    image = own.root / "images" / "validation" / "val_000.jpg"
    assert main(["predict", "--onnx", str(exported), "--out", str(tmp_path / "pred"), str(image)]) == 0
    pred = cv2.imread(str(tmp_path / "pred" / "val_000.png"), cv2.IMREAD_UNCHANGED)
    legend = cv2.imread(str(tmp_path / "pred" / "val_000_overlay.png"))[:, pred.shape[1] :].reshape(-1, 3)
    for class_id in np.unique(pred).tolist():
        assert tuple(PALETTE[class_id][::-1]) in {tuple(c) for c in legend.tolist()}

    _, config, _ = model_from_checkpoint(None, checkpoint)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    folder = save_segmentation_model(
        tmp_path / "pyfunc", checkpoint=checkpoint, config=config, overrides=state["overrides"]
    )
    metadata = mlflow.models.Model.load(str(folder)).metadata
    assert metadata["class_names"] == list(CLASSES) and metadata["palette"] == PALETTE
    served = mlflow.pyfunc.load_model(str(folder))
    rgb = cv2.imread(str(image))[:, :, ::-1]
    assert (
        main(["predict", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "torch"), str(image)]) == 0
    )
    expected = cv2.imread(str(tmp_path / "torch" / "val_000.png"), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(np.asarray(served.predict(rgb)), expected)  # the same code as predict
