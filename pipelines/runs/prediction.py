"""Segment image and video files with a loaded model: class-index PNGs and colour overlays with a legend;
a video (``.mp4``, ``.avi``, ``.mov``, ``.mkv``) becomes an overlay video, frame by frame.

The model is the PyTorch segmentor or anything called like its ``forward`` (an
:class:`pipelines.engine.onnx_session.OnnxSegmentor`): the same test pipeline, sliding windows and view
averaging run around it (:func:`pipelines.engine.evaluator.predict_probabilities`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from models.config import SegmentorConfig
from pipelines.config.specs import EvalMode, test_pipeline
from pipelines.engine.evaluator import InferenceSettings
from pipelines.engine.labels import predict_labels
from pipelines.runs.inputs import class_names, palette, safe_stem

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv")
VIDEO_FOURCC = "mp4v"
Forward = nn.Module | Callable[[torch.Tensor], torch.Tensor]


def is_video(path: Path) -> bool:
    """Whether ``path`` is read as a video (by its extension)."""
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def model_device(model: Forward) -> torch.device:
    """Where ``model``'s parameters live (the CPU for a callable without parameters, e.g. ONNX sessions)."""
    parameters = getattr(model, "parameters", None)
    if parameters is None:
        return torch.device("cpu")
    return next(parameters()).device


class Segmenter:
    """Image in, class-index map out: the test pipeline of ``config`` around ``model``.

    Args:
        model: the segmentor (in eval mode), or a callable like its ``forward``.
        config: its zoo entry.
        mode: ``ss`` or ``ms``.
        inference: ``slide``/``whole`` instead of the config's.
        batch_windows: sliding windows per forward.
        device: where the images go (default: the model's device).
    """

    def __init__(
        self,
        model: Forward,
        config: SegmentorConfig,
        *,
        mode: EvalMode = "ss",
        inference: Literal["slide", "whole"] | None = None,
        batch_windows: int = 4,
        device: torch.device | None = None,
    ) -> None:
        self.model = model
        self.num_classes = config.num_classes
        self.device = device or model_device(model)
        self.pipeline = test_pipeline(config, mode)
        self.settings = InferenceSettings.from_config(config, mode=inference, batch_windows=batch_windows)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 BGR image -> (H, W) uint8 train ids (argmax of the averaged probabilities)."""
        labels = predict_labels(
            self.model, image, self.pipeline, self.settings, num_classes=self.num_classes, device=self.device
        )  # memory linear in the pixels: large photos never hold K x H x W probabilities
        return labels.astype(np.uint8)


def unique_stem(stem: str, used: set[str]) -> str:
    """``stem``, or ``stem_2``, ``stem_3``, ... when an earlier input of this call had the same name."""
    candidate, number = stem, 1
    while candidate in used:
        number += 1
        candidate = f"{stem}_{number}"
    used.add(candidate)
    return candidate


def predict_images(
    model: Forward,
    config: SegmentorConfig,
    images: Sequence[Path],
    out: Path,
    *,
    mode: EvalMode = "ss",
    inference: Literal["slide", "whole"] | None = None,
    batch_windows: int = 4,
    device: torch.device | None = None,
    progress: bool = True,
) -> list[Path]:
    """Write ``OUT/<stem>.png`` (train ids) and ``OUT/<stem>_overlay.png`` for each image, and
    ``OUT/<stem>_overlay.mp4`` for each video; returns the files written (PNGs of the class maps, videos).

    Args:
        model: the segmentor, or a callable like its ``forward`` (an ONNX session wrapper).
        config: its zoo entry.
        images: image files, or videos (by extension: :data:`VIDEO_SUFFIXES`).
        out: output folder.
        mode, inference, batch_windows: as :class:`Segmenter`.
        device: where the images go (default: the model's device).
        progress: a progress bar over each video's frames.

    Raises:
        FileNotFoundError: an input does not exist (checked for all before the first prediction).
        ValueError: an image or video cannot be decoded, naming it.
    """
    import cv2

    from pipelines.reporting.visualize import overlay_with_legend

    missing = [str(p) for p in images if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"no such image file: {', '.join(missing)}")
    segment = Segmenter(
        model, config, mode=mode, inference=inference, batch_windows=batch_windows, device=device
    )
    out.mkdir(parents=True, exist_ok=True)
    names, colors = class_names(config), palette(config)
    written: list[Path] = []
    used: set[str] = set()
    for image_path in images:
        if is_video(Path(image_path)):
            stem = unique_stem(safe_stem(Path(image_path).stem), used)
            written.append(
                predict_video(segment, Path(image_path), out, colors, stem=stem, progress=progress)
            )
            continue
        image = cv2.imread(str(image_path), cv2.IMREAD_COLOR)
        if image is None:
            raise ValueError(f"{image_path}: not a readable image")
        pred = segment(image)
        stem = unique_stem(safe_stem(Path(image_path).stem), used)
        target = out / f"{stem}.png"
        cv2.imwrite(str(target), pred)
        cv2.imwrite(str(out / f"{stem}_overlay.png"), overlay_with_legend(image, pred, colors, names))
        log.info("%s -> %s (classes %s)", image_path, target, sorted(int(c) for c in np.unique(pred)))
        written.append(target)
    return written


def predict_video(
    segment: Segmenter,
    video: Path,
    out: Path,
    colors: np.ndarray,
    *,
    stem: str | None = None,
    progress: bool = True,
) -> Path:
    """Segment every frame of ``video`` and write ``OUT/<stem>_overlay.mp4`` (colours blended over the frames,
    same size and frame rate, ``mp4v``; ``stem`` defaults to the video's).

    Raises:
        ValueError: the video cannot be opened or holds no frame, naming it.
    """
    import cv2
    from tqdm import tqdm

    from pipelines.reporting.visualize import OVERLAY_ALPHA, colorize

    capture = cv2.VideoCapture(str(video))
    if not capture.isOpened():
        raise ValueError(f"{video}: not a readable video")
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    target = out / f"{stem or safe_stem(video.stem)}_overlay.mp4"
    staged = out / f".{target.name}.partial.mp4"
    writer: cv2.VideoWriter | None = None
    frames = 0
    try:
        with tqdm(
            total=total, desc=video.name, unit="frame", disable=not progress, dynamic_ncols=True
        ) as bar:
            while True:
                ok, frame = capture.read()
                if not ok:
                    break
                if writer is None:
                    size = (frame.shape[1], frame.shape[0])
                    writer = cv2.VideoWriter(str(staged), cv2.VideoWriter_fourcc(*VIDEO_FOURCC), fps, size)
                    if not writer.isOpened():
                        raise ValueError(f"{target}: cannot write an {VIDEO_FOURCC} video here")
                pred = segment(frame)
                writer.write(
                    cv2.addWeighted(frame, 1.0 - OVERLAY_ALPHA, colorize(pred, colors), OVERLAY_ALPHA, 0.0)
                )
                frames += 1
                bar.update(1)
    finally:
        capture.release()
        if writer is not None:
            writer.release()
    if frames == 0:
        staged.unlink(missing_ok=True)
        raise ValueError(f"{video}: no frame could be read")
    staged.replace(target)
    log.info("%s -> %s (%d frames at %.1f fps)", video, target, frames, fps)
    return target
