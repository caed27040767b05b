"""The command line as people use it: folders and globs for ``predict``, a run that goes on past a bad image,
``evaluate``'s per-class table and ``--show-dir``, ``checkpoint export|import`` without the zoo entry's name."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import models
from data.atomic import OWNER_MARKER
from data.readers import find_samples, load_sample
from data.synthetic import synthesize
from models.checkpoint import load_checkpoint_file
from pipelines.cli import main
from pipelines.engine.checkpoints import save_checkpoint_file
from pipelines.reporting.visualize import LEGEND_WIDTH, OVERLAY_ALPHA, colorize
from pipelines.runs import prediction
from pipelines.runs.inputs import safe_stem
from pipelines.runs.prediction import expand_inputs
from pipelines.runs.show import comparison_image

NAME = "upernet_deit_adapter_tiny_512_160k_ade20k"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A training-style checkpoint of the tiny model: it records its zoo entry and overrides."""
    torch.manual_seed(0)
    model = models.create_segmentor(NAME, preset="tiny")
    state = {"config": NAME, "overrides": models.zoo.resolved_overrides(NAME, {}, preset="tiny"),
             "state_dict": model.state_dict()}  # fmt: skip
    return save_checkpoint_file(state, tmp_path_factory.mktemp("ckpt") / "tiny.pth")


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic official ADE20K folder with two validation images."""
    root = tmp_path_factory.mktemp("raw")
    report = synthesize(
        "ade20k", root / "raw", num_train=1, num_val=2, seed=3, min_size=64, max_size=96, num_classes_used=4
    )
    return Path(report.root)


def _image(path: Path, value: int = 90, size: tuple[int, int] = (64, 64)) -> Path:
    rng = np.random.default_rng(value)
    assert cv2.imwrite(str(path), rng.integers(0, 255, (*size, 3), dtype=np.uint8))
    return path


def _written(out: Path) -> list[str]:
    return sorted(p.stem for p in out.glob("*.png") if not p.stem.endswith("_overlay"))


def test_expand_inputs_takes_files_folders_and_globs_in_order(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    for name in ("b.JPG", "a.png", "sub/c.png", ".hidden.png", "notes.txt"):
        (photos / name).write_bytes(b"x")
    (tmp_path / "clip.mkv").write_bytes(b"x")
    (tmp_path / "odd.data").write_bytes(b"x")
    got = expand_inputs(
        [str(tmp_path / "odd.data"), str(photos), str(tmp_path / "*.mkv"), str(photos / "a.png")]
    )
    # a named file whatever its extension; a folder's images sorted, not recursive; a duplicate kept once
    assert got == [tmp_path / "odd.data", photos / "a.png", photos / "b.JPG", tmp_path / "clip.mkv"]
    assert expand_inputs([str(tmp_path / "**" / "c.png")]) == [photos / "sub" / "c.png"]  # ** recursive


def test_input_errors_name_the_input_before_the_model_loads(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    empty, foreign = tmp_path / "empty", tmp_path / "foreign"
    empty.mkdir()
    foreign.mkdir()
    (foreign / "notes.txt").write_text("no image")
    # the checkpoint does not exist either: an input error first means the inputs were checked first
    base = ["predict", "--checkpoint", str(tmp_path / "absent.pth"), "--out", str(tmp_path / "out")]
    pattern = str(tmp_path / "photos" / "*.jpg")
    for inputs, expected in (
        ([pattern], f"no file matches {pattern!r}"),
        ([str(empty)], f"{empty}: no image or video file in this folder"),
        ([str(foreign)], f"{foreign}: no image or video file in this folder"),
        ([str(foreign / "*.txt")], f"{str(foreign / '*.txt')!r} matches no image or video file"),
        ([str(tmp_path / "nope.png")], f"no such image file: {tmp_path / 'nope.png'}"),
    ):
        caplog.clear()
        assert main([*base, *inputs]) == 1
        assert expected in caplog.text
        assert "absent.pth" not in caplog.text and "Traceback" not in caplog.text
    assert not (tmp_path / "out").exists()


def test_predict_reads_folders_and_globs(
    checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    photos, more = tmp_path / "photos", tmp_path / "more"
    (photos / "sub").mkdir(parents=True)
    more.mkdir()
    _image(photos / "a.png", 1)
    _image(photos / "b.jpg", 2)
    _image(photos / "sub" / "c.png", 3)  # a sub-folder is not read
    (photos / "notes.txt").write_text("not an input")
    _image(more / "d.png", 4)
    _image(more / "e.bmp", 5)  # not matched by the glob
    out = tmp_path / "out"
    args = ["predict", "--checkpoint", str(checkpoint), "--out", str(out), str(photos), str(more / "*.png")]
    assert main(args) == 0
    assert _written(out) == ["a", "b", "d"]
    assert "3 written" in caplog.text and "failed" not in caplog.text


def test_predict_goes_on_past_bad_inputs_and_exits_1(
    checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    _image(inputs / "1_good.png", 1)
    (inputs / "2_empty.jpg").write_bytes(b"")
    jpeg = cv2.imencode(".jpg", np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))[1]
    (inputs / "3_truncated.jpg").write_bytes(jpeg.tobytes()[: len(jpeg) // 2])  # OpenCV decodes it silently
    (inputs / "4_text.png").write_text("not an image at all")
    _image(inputs / "5_huge.png", 5, size=(64, 77))
    (inputs / "6_video.mp4").write_bytes(b"not a video")
    _image(inputs / "7_good.jpg", 7)

    real = prediction.predict_labels

    def predict_labels(model, image, *args, source: str = "the image", **kwargs):
        if image.shape[1] == 77:  # what pipelines.engine.labels raises for a photo too large for memory
            raise MemoryError(f"{source}: a 77 x 64 image does not fit in memory for 150-class prediction")
        return real(model, image, *args, source=source, **kwargs)

    monkeypatch.setattr(prediction, "predict_labels", predict_labels)
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(checkpoint), "--out", str(out), str(inputs)]) == 1
    assert _written(out) == ["1_good", "7_good"]
    assert (out / "7_good_overlay.png").is_file()  # the input after the failures was still segmented
    summary = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("2 written"))
    assert summary.startswith("2 written, 5 failed: ")
    for name, reason in (
        ("2_empty.jpg", "an empty file"),
        ("3_truncated.jpg", "a truncated or corrupt JPEG"),
        ("4_text.png", "not a readable image"),
        ("5_huge.png", "a 77 x 64 image does not fit in memory"),
        ("6_video.mp4", "not a readable video|no frame could be read"),
    ):
        assert any(f"{inputs / name} ({one}" in summary for one in reason.split("|")), name
        assert any(r.levelname == "WARNING" and name in r.getMessage() for r in caplog.records), name
    # no half-written video left behind; only the marker that the folder is vitadapter's
    assert [p.name for p in out.glob(".*")] == [".vitadapter-output.json"]


def test_comparison_image_puts_image_prediction_and_truth_side_by_side() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (100, 30, 3), dtype=np.uint8)  # taller than the legend of 3 classes
    pred = rng.integers(0, 3, (100, 30))
    label = rng.integers(0, 3, (100, 30)).astype(np.uint8)
    label[:5] = 255
    colors = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    canvas = comparison_image(image, pred, label, colors, ["red", "green", "blue"])
    assert canvas.shape == (100, 3 * 30 + LEGEND_WIDTH, 3)
    assert np.array_equal(canvas[:, :30], image)
    blended = cv2.addWeighted(image, 1 - OVERLAY_ALPHA, colorize(pred, colors), OVERLAY_ALPHA, 0.0)
    assert np.array_equal(canvas[:, 30:60], blended)
    truth = canvas[:, 60:90]
    assert not truth[:5].any()  # ignored pixels black
    expected = cv2.addWeighted(image, 1 - OVERLAY_ALPHA, colorize(label, colors), OVERLAY_ALPHA, 0.0)
    assert np.array_equal(truth[5:], expected[5:])


def test_evaluate_prints_a_class_table_and_writes_show_dir(
    checkpoint: Path, raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    show, metrics = tmp_path / "show", tmp_path / "metrics.json"
    args = ["evaluate", "--no-tracking", "--checkpoint", str(checkpoint), "--data", str(raw), "--no-progress"]
    assert main([*args, "--limit", "2", "--show-dir", str(show), "--out", str(metrics)]) == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out)  # stdout stays the JSON alone
    assert printed["num_images"] == 2
    lines = captured.err.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split() == ["id", "class", "IoU", "Acc"])
    table = lines[header : header + 152]  # header, 150 classes, mean
    assert len({len(line) for line in table}) == 1  # aligned columns
    per_class = json.loads(metrics.read_text())["per_class"]
    for index in (0, 1, 149):
        fields = table[1 + index].split()
        iou, acc = per_class["IoU"][index], per_class["Acc"][index]
        assert fields[0] == str(index) and " ".join(fields[1:-2]) == per_class["name"][index].strip()
        assert fields[-2:] == ["-" if v is None else f"{v:.2f}" for v in (iou, acc)]
    assert table[-1].split() == ["mean", f"{printed['mIoU']:.2f}", f"{printed['mAcc']:.2f}"]

    samples = find_samples("ade20k", raw, "val")
    drawn = [show / f"{safe_stem(sample.key)}.png" for sample in samples]
    assert sorted(p.name for p in show.iterdir()) == sorted([OWNER_MARKER, *(p.name for p in drawn)])
    for sample, path in zip(samples, drawn, strict=True):
        loaded = load_sample(sample)
        height, width = loaded.label.shape
        picture = cv2.imread(str(path), cv2.IMREAD_COLOR)
        assert picture.shape[1] == 3 * width + LEGEND_WIDTH and picture.shape[0] >= height
        assert np.array_equal(picture[:height, :width], loaded.image)
        assert not picture[:height, 2 * width : 3 * width][loaded.label == 255].any()

    # --limit: only what is evaluated is drawn; a folder vitadapter wrote is written into again
    drawn[1].unlink()
    assert main(["-q", *args, "--limit", "1", "--show-dir", str(show)]) == 0
    assert not drawn[1].exists() and drawn[0].is_file()
    assert "id  class" not in capsys.readouterr().err  # -q: no table


def test_show_dir_refuses_a_foreign_folder(
    tmp_path: Path, raw: Path, caplog: pytest.LogCaptureFixture
) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "holiday.png").write_bytes(b"x")
    args = ["evaluate", "--checkpoint", str(tmp_path / "absent.pth"), "--data", str(raw)]
    assert main([*args, "--show-dir", str(foreign)]) == 1
    assert f"{foreign} is not empty" in caplog.text and "was not written by vitadapter" in caplog.text
    assert "absent.pth" not in caplog.text  # refused before the model loads
    assert sorted(p.name for p in foreign.iterdir()) == ["holiday.png"]


def test_checkpoint_export_and_import_take_the_name_from_the_checkpoint(
    checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    official = tmp_path / "official.pth"
    assert (
        main(["checkpoint", "export", str(checkpoint), "--out", str(official)]) == 0
    )  # NAME and overrides recorded
    exported = load_checkpoint_file(official)
    assert exported["meta"]["zoo_entry"] == NAME
    source = load_checkpoint_file(checkpoint)["state_dict"]
    assert list(exported["state_dict"]) == list(source)
    assert all(torch.equal(exported["state_dict"][k], v) for k, v in source.items())
    # the export records the entry (not the overrides): import it back without NAME
    ours = tmp_path / "ours.pth"
    assert main(["checkpoint", "import", str(official), "--out", str(ours), "--preset", "tiny"]) == 0
    assert load_checkpoint_file(ours)["config"] == NAME
    # NAME SRC still works, with the options between them too
    again = tmp_path / "again.pth"
    assert main(["checkpoint", "export", NAME, "--out", str(again), str(ours)]) == 0
    assert load_checkpoint_file(again)["meta"]["zoo_entry"] == NAME

    # an official file that records no entry: the name is needed, and the message says so
    bare = save_checkpoint_file({"meta": {"iter": 7}, "state_dict": source}, tmp_path / "bare.pth")
    caplog.clear()
    assert (
        main(["checkpoint", "import", str(bare), "--out", str(tmp_path / "x.pth"), "--preset", "tiny"]) == 1
    )
    assert f"{bare} records no zoo entry: give the NAME of its zoo entry" in caplog.text
    assert not (tmp_path / "x.pth").exists()
    assert (
        main(["checkpoint", "import", NAME, str(bare), "--out", str(tmp_path / "x.pth"), "--preset", "tiny"])
        == 0
    )
    caplog.clear()
    assert main(["checkpoint", "export", NAME, str(bare), str(bare), "--out", str(tmp_path / "y.pth")]) == 1
    assert "give [NAME] SRC, got 3 positional arguments" in caplog.text

    # a file recording another entry is never converted under NAME, even where the shapes would fit (the
    # AugReg-T entry has the tiny DeiT's layout): an error naming both, and nothing written
    other = "upernet_augreg_adapter_tiny_512_160k_ade20k"
    for action, source in (("export", checkpoint), ("import", official), ("export", official)):
        caplog.clear()
        out = tmp_path / f"{action}-{source.stem}-as-other.pth"
        assert main(["checkpoint", action, other, str(source), "--out", str(out), "--preset", "tiny"]) == 1
        assert f"{source} holds weights of zoo entry {NAME!r}, not {other!r}" in caplog.text
        assert not out.exists()


def test_predict_never_writes_into_a_folder_it_did_not_write(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A non-empty --out folder without the project's marker is refused before the model loads, and the
    user's file that a prediction of the same name would replace is left as it was."""
    photo = tmp_path / "holiday.png"
    cv2.imwrite(str(photo), np.zeros((40, 40, 3), np.uint8))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "holiday.png").write_bytes(b"my own picture")
    args = ["predict", "--checkpoint", str(tmp_path / "absent.pth"), "--out", str(mine), str(photo)]
    assert main(args) == 1
    assert f"{mine} is not empty" in caplog.text and "absent.pth" not in caplog.text
    assert (mine / "holiday.png").read_bytes() == b"my own picture"
