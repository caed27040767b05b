"""``vitadapter predict`` on a video: an overlay video, frame by frame (a tiny synthetic video made here)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import models
from pipelines.cli import main
from pipelines.engine.checkpoints import save_checkpoint_file
from pipelines.runs.prediction import is_video

NAME = "upernet_deit_adapter_tiny_512_160k_ade20k"
FRAMES, SIZE, FPS = 6, (72, 96), 10.0


def _synthetic_video(path: Path) -> list[np.ndarray]:
    """A bright square moving over a gradient, written with cv2's mp4v writer."""
    height, width = SIZE
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (width, height))
    assert writer.isOpened()
    frames = []
    for t in range(FRAMES):
        frame = np.zeros((height, width, 3), np.uint8)
        frame[:] = np.linspace(0, 200, width, dtype=np.uint8)[None, :, None]
        frame[20:44, 8 + 10 * t : 32 + 10 * t] = (40, 220, 250)
        writer.write(frame)
        frames.append(frame)
    writer.release()
    return frames


def test_video_in_overlay_video_out(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = models.create_segmentor(NAME, preset="tiny")
    checkpoint = save_checkpoint_file(
        {"config": NAME, "overrides": models.zoo.resolved_overrides(NAME, {}, preset="tiny"),
         "state_dict": model.state_dict()},
        tmp_path / "tiny.pth",
    )  # fmt: skip
    _synthetic_video(tmp_path / "clip.mp4")
    still = tmp_path / "still.png"
    cv2.imwrite(str(still), np.full((64, 64, 3), 90, np.uint8))
    # NAME left out: the checkpoint records it; a video and an image in one call
    out = tmp_path / "out"
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(checkpoint),
                "--out",
                str(out),
                str(tmp_path / "clip.mp4"),
                str(still),
            ]
        )
        == 0
    )
    assert (out / "still.png").is_file()
    capture = cv2.VideoCapture(str(out / "clip_overlay.mp4"))
    assert capture.isOpened()
    assert capture.get(cv2.CAP_PROP_FPS) == pytest.approx(FPS)
    read = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        read.append(frame)
    capture.release()
    assert len(read) == FRAMES and read[0].shape == (*SIZE, 3)
    assert not list(out.glob(".*partial*"))  # written aside, then moved into place


def test_video_detection_and_unreadable_video(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert is_video(Path("a.MP4")) and is_video(Path("b.mkv")) and not is_video(Path("c.png"))
    (tmp_path / "broken.avi").write_bytes(b"not a video")
    torch.manual_seed(0)
    checkpoint = save_checkpoint_file(
        {"config": NAME, "overrides": models.zoo.resolved_overrides(NAME, {}, preset="tiny"),
         "state_dict": models.create_segmentor(NAME, preset="tiny").state_dict()},
        tmp_path / "tiny.pth",
    )  # fmt: skip
    args = [
        "predict",
        NAME,
        "--checkpoint",
        str(checkpoint),
        "--out",
        str(tmp_path / "o"),
        str(tmp_path / "broken.avi"),
    ]
    assert main(args) == 1
    assert "broken.avi" in caplog.text and (
        "not a readable video" in caplog.text or "no frame" in caplog.text
    )
