"""``vitadapter evaluate --show-dir``: per evaluated image, the image, the prediction and the ground truth side by side.

Each picture is ``[image | prediction overlay | ground-truth overlay | legend]``: the class colours of the
palette blended over the image (:data:`pipelines.reporting.visualize.OVERLAY_ALPHA`), ignored pixels of the
ground truth (``ignore_index``, 255) black, and one legend of the classes present in either map. It is drawn
by :func:`pipelines.reporting.visualize.overlay_with_legend` and written atomically as ``DIR/<key>.png``. The
folder is claimed with the project's owner marker (:func:`data.atomic.claim_folder`): a non-empty folder the
project did not write is refused before anything runs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from data.atomic import write_bytes_atomic
from models.config import IGNORE_INDEX, SegmentorConfig
from pipelines.runs.inputs import class_names, palette, safe_stem
from pipelines.runs.prediction import unique_stem

log = logging.getLogger(__name__)


def comparison_image(
    image: np.ndarray,
    pred: np.ndarray,
    label: np.ndarray,
    colors: np.ndarray,
    names: tuple[str, ...] | list[str],
    *,
    ignore_index: int = IGNORE_INDEX,
) -> np.ndarray:
    """The image, the prediction overlay and the ground-truth overlay side by side, then a legend.

    Args:
        image: (H, W, 3) uint8 BGR.
        pred: (H, W) predicted train ids.
        label: (H, W) ground-truth train ids with ``ignore_index``.
        colors: (K, 3) uint8 RGB palette.
        names: the K class names.
        ignore_index: the label value drawn black.

    Returns:
        (max(H, legend), 3 W + legend width, 3) uint8 BGR (white below the panels where the legend is taller).
    """
    from pipelines.reporting.visualize import overlay_with_legend

    image = np.ascontiguousarray(image, dtype=np.uint8)
    pred, label = np.asarray(pred, dtype=np.int64), np.asarray(label, dtype=np.int64)
    if pred.shape != image.shape[:2] or label.shape != image.shape[:2]:
        raise ValueError(
            f"image {image.shape[:2]}, prediction {pred.shape} and label {label.shape} differ in size"
        )
    height, width = pred.shape
    # both overlays and one legend of what either holds (ignored pixels are outside the palette: no entry)
    overlays = overlay_with_legend(np.hstack([image, image]), np.hstack([pred, label]), colors, names)
    gt_panel = overlays[:height, width : 2 * width]
    gt_panel[label == ignore_index] = 0
    canvas = np.full((overlays.shape[0], width + overlays.shape[1], 3), 255, dtype=np.uint8)
    canvas[:height, :width] = image
    canvas[:, width:] = overlays
    return canvas


class ComparisonWriter:
    """``on_prediction`` of :func:`pipelines.runs.evaluation.evaluate_model`: writes ``OUT/<key>.png``
    (:func:`comparison_image`) for every evaluated item.

    The folder must already be claimed (:func:`data.atomic.claim_folder`). In a distributed evaluation each
    rank writes the images it evaluates (their shares are disjoint).

    Args:
        out: the folder.
        config: the zoo entry (class names and palette).

    Attributes:
        written: the files written, in order.
    """

    def __init__(self, out: Path, config: SegmentorConfig) -> None:
        self.out = Path(out)
        self.colors = palette(config)
        self.names = class_names(config)
        self.written: list[Path] = []
        self._used: set[str] = set()

    def __call__(self, item: dict[str, Any], pred: np.ndarray) -> None:
        import cv2

        key = str(item.get("key", f"image_{len(self.written)}"))
        canvas = comparison_image(
            np.asarray(item["image"]), pred, np.asarray(item["label"]), self.colors, self.names
        )
        ok, encoded = cv2.imencode(".png", canvas)
        if not ok:
            raise ValueError(f"{key}: PNG encoding of the comparison image failed")
        target = self.out / f"{unique_stem(safe_stem(key), self._used)}.png"
        write_bytes_atomic(target, encoded.tobytes())
        log.debug("%s -> %s", key, target)
        self.written.append(target)
