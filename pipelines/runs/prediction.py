"""Segment image and video files with a loaded model: class-index PNGs and colour overlays with a legend;
a video (``.mp4``, ``.avi``, ``.mov``, ``.mkv``) becomes an overlay video, frame by frame.

The inputs may name files, folders (their image and video files) and glob patterns
(:func:`expand_inputs`, checked before a model is loaded). An input that cannot be read or segmented
(an empty, truncated or foreign file, an image too large for memory) is reported and skipped: the others
are still written (:class:`PredictionResult`).

The model is the PyTorch segmentor or anything called like its ``forward`` (an
:class:`pipelines.engine.onnx_session.OnnxSegmentor`): the same test pipeline, sliding windows and view
averaging run around it (:func:`pipelines.engine.views.predict_probabilities`).
"""

from __future__ import annotations

import glob
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from models.config import SegmentorConfig
from pipelines.config.specs import EvalMode, test_pipeline
from pipelines.engine.labels import predict_labels
from pipelines.engine.views import InferenceSettings
from pipelines.runs.inputs import class_names, palette, safe_stem

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
INPUT_SUFFIXES = IMAGE_SUFFIXES + VIDEO_SUFFIXES
GLOB_CHARACTERS = "*?["
JPEG_START = b"\xff\xd8\xff"
VIDEO_FOURCC = "mp4v"
Forward = nn.Module | Callable[[torch.Tensor], torch.Tensor]


def is_video(path: Path) -> bool:
    """Whether ``path`` is read as a video (by its extension)."""
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def is_input_file(path: Path) -> bool:
    """Whether a folder's or a glob's entry ``path`` is taken as an input: a visible file with an image or
    video extension (:data:`INPUT_SUFFIXES`, any case)."""
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in INPUT_SUFFIXES


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """The files that ``inputs`` name, in order, each once: a file as it is (whatever its extension), a
    folder as its image and video files (sorted, not its sub-folders), a glob pattern (``photos/*.jpg``,
    ``**`` recursive) as the image and video files it matches (sorted).

    Raises:
        FileNotFoundError: a file that does not exist, a glob that matches nothing, or a folder or glob
            without an image or video file, naming every such input (before any model is loaded).
    """
    files: list[Path] = []
    missing: list[str] = []
    problems: list[str] = []
    for given in inputs:
        path = Path(given)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = sorted(p for p in path.iterdir() if is_input_file(p))
            if not found:
                problems.append(
                    f"{path}: no image or video file in this folder ({', '.join(INPUT_SUFFIXES)})"
                )
            files.extend(found)
        elif any(character in str(given) for character in GLOB_CHARACTERS):
            matches = sorted(glob.glob(str(given), recursive=True))
            found = [Path(p) for p in matches if is_input_file(Path(p))]
            if not matches:
                problems.append(f"no file matches {str(given)!r}")
            elif not found:
                problems.append(
                    f"{str(given)!r} matches no image or video file ({', '.join(INPUT_SUFFIXES)})"
                )
            files.extend(found)
        else:
            missing.append(str(path))
    if missing:
        problems.insert(0, f"no such image file: {', '.join(missing)}")
    if problems:
        raise FileNotFoundError("; ".join(problems))
    unique: dict[Path, Path] = {}
    for path in files:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def read_image(path: Path) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 BGR.

    Raises:
        ValueError: the reason it cannot be read (empty file, not a readable image, truncated JPEG), without
            the path (OpenCV decodes a truncated JPEG without an error, grey below the cut; Pillow tells).
    """
    import cv2

    size = path.stat().st_size
    if size == 0:
        raise ValueError("an empty file")
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError("not a readable image")
    with path.open("rb") as handle:
        jpeg = handle.read(len(JPEG_START)) == JPEG_START
    if jpeg:
        import warnings

        from PIL import Image

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # OpenCV has decoded it
            try:
                with Image.open(path) as decoded:
                    decoded.draft("RGB", (max(1, decoded.width // 8), max(1, decoded.height // 8)))
                    decoded.load()  # the whole entropy-coded data, at 1/8 scale: cheap
            except Image.DecompressionBombError:
                pass  # beyond Pillow's pixel guard: OpenCV's decoding is all there is
            except OSError as err:
                raise ValueError(f"a truncated or corrupt JPEG ({err})") from None
    return image


@dataclass
class PredictionResult:
    """What :func:`predict_images` did.

    Attributes:
        written: per input written, its class-index PNG (an image) or its overlay video.
        failed: per input that could not be read or segmented, ``(input, reason)``.
    """

    written: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)

    def summary(self) -> str:
        """One line: ``N written`` and, if any, ``M failed: a.jpg (reason), ...``."""
        line = f"{len(self.written)} written"
        if self.failed:
            reasons = ", ".join(f"{path} ({reason})" for path, reason in self.failed)
            line += f", {len(self.failed)} failed: {reasons}"
        return line


def _reason(err: BaseException, path: Path) -> str:
    """The message of ``err`` without a leading ``<path>: ``."""
    text = str(err) or type(err).__name__
    prefix = f"{path}: "
    return text[len(prefix) :] if text.startswith(prefix) else text


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

    def __call__(self, image: np.ndarray, *, source: str = "the image") -> np.ndarray:
        """(H, W, 3) uint8 BGR image -> (H, W) uint8 train ids (argmax of the averaged probabilities).

        Raises:
            MemoryError: the image does not fit in memory, naming ``source`` and its size.
        """
        labels = predict_labels(
            self.model,
            image,
            self.pipeline,
            self.settings,
            num_classes=self.num_classes,
            device=self.device,
            source=source,
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


def write_png(path: Path, image: np.ndarray) -> Path:
    """``image`` as a PNG at ``path``, written atomically (a reader never sees half a file)."""
    import cv2

    from data.atomic import write_bytes_atomic

    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise ValueError(f"{path}: the image could not be encoded as PNG")
    return write_bytes_atomic(path, encoded.tobytes())


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
) -> PredictionResult:
    """Write ``OUT/<stem>.png`` (train ids) and ``OUT/<stem>_overlay.png`` for each image, and
    ``OUT/<stem>_overlay.mp4`` for each video.

    An input that cannot be read or segmented (empty, truncated, not an image or video, too large for
    memory) is logged as a warning naming it and the reason, and skipped; the next inputs still run.

    Args:
        model: the segmentor, or a callable like its ``forward`` (an ONNX session wrapper).
        config: its zoo entry.
        images: image files, or videos (by extension: :data:`VIDEO_SUFFIXES`).
        out: output folder.
        mode, inference, batch_windows: as :class:`Segmenter`.
        device: where the images go (default: the model's device).
        progress: a progress bar over each video's frames.

    Returns:
        The files written (per input: the class-index PNG, or the overlay video) and the inputs that failed
        with their reasons.

    Raises:
        FileNotFoundError: an input does not exist (checked for all before the first prediction).
    """

    from pipelines.reporting.visualize import overlay_with_legend

    missing = [str(p) for p in images if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"no such image file: {', '.join(missing)}")
    segment = Segmenter(
        model, config, mode=mode, inference=inference, batch_windows=batch_windows, device=device
    )
    out.mkdir(parents=True, exist_ok=True)
    names, colors = class_names(config), palette(config)
    result = PredictionResult()
    used: set[str] = set()
    for image_path in map(Path, images):
        try:
            if is_video(image_path):
                stem = unique_stem(safe_stem(image_path.stem), used)
                result.written.append(
                    predict_video(segment, image_path, out, colors, stem=stem, progress=progress)
                )
                continue
            image = read_image(image_path)
            pred = segment(image, source=str(image_path))
        except (ValueError, OSError, MemoryError, torch.cuda.OutOfMemoryError) as err:
            reason = _reason(err, image_path)
            log.warning("%s: %s; skipped", image_path, reason)
            result.failed.append((image_path, reason))
            if isinstance(err, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
            continue
        stem = unique_stem(safe_stem(image_path.stem), used)
        target = out / f"{stem}.png"
        write_png(target, pred)
        write_png(out / f"{stem}_overlay.png", overlay_with_legend(image, pred, colors, names))
        log.info("%s -> %s (classes %s)", image_path, target, sorted(int(c) for c in np.unique(pred)))
        result.written.append(target)
    return result


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
        MemoryError: a frame does not fit in memory (nothing is left behind).
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
                pred = segment(frame, source=f"frame {frames}")
                writer.write(
                    cv2.addWeighted(frame, 1.0 - OVERLAY_ALPHA, colorize(pred, colors), OVERLAY_ALPHA, 0.0)
                )
                frames += 1
                bar.update(1)
    except BaseException:
        if writer is not None:
            writer.release()
            writer = None
        staged.unlink(missing_ok=True)  # nothing half-written stays behind
        raise
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
