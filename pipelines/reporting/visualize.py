"""Colour overlays of predictions with a legend of the classes present."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

OVERLAY_ALPHA = 0.5
LEGEND_ROW = 22
LEGEND_SWATCH = 16
LEGEND_WIDTH = 220
FONT_SCALE = 0.45


def colorize(pred: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """(H, W) train ids -> (H, W, 3) uint8 BGR colours (ids outside the palette are black)."""
    colors = np.zeros((max(int(pred.max()) + 1, len(palette)), 3), dtype=np.uint8)
    colors[: len(palette)] = palette[:, ::-1]  # RGB -> BGR
    return colors[pred]


def overlay_with_legend(
    image: np.ndarray, pred: np.ndarray, palette: np.ndarray, class_names: Sequence[str]
) -> np.ndarray:
    """Blend the coloured prediction over ``image`` (BGR) and append a legend of the classes present.

    Returns:
        (H', W + legend, 3) uint8 BGR.
    """
    blended = cv2.addWeighted(image, 1.0 - OVERLAY_ALPHA, colorize(pred, palette), OVERLAY_ALPHA, 0.0)
    ids, counts = np.unique(pred, return_counts=True)
    present = [int(i) for i in ids[np.argsort(-counts)] if i < len(class_names)]
    height = max(blended.shape[0], LEGEND_ROW * (len(present) + 1))
    canvas = np.full((height, blended.shape[1] + LEGEND_WIDTH, 3), 255, dtype=np.uint8)
    canvas[: blended.shape[0], : blended.shape[1]] = blended
    x0 = blended.shape[1] + 8
    for row, class_id in enumerate(present):
        y = 6 + row * LEGEND_ROW
        color = tuple(int(c) for c in palette[class_id][::-1])
        cv2.rectangle(canvas, (x0, y), (x0 + LEGEND_SWATCH, y + LEGEND_SWATCH), color, thickness=-1)
        label = f"{class_id}: {class_names[class_id].strip()}"
        cv2.putText(
            canvas,
            label,
            (x0 + LEGEND_SWATCH + 6, y + 13),
            cv2.FONT_HERSHEY_SIMPLEX,
            FONT_SCALE,
            (0, 0, 0),
            1,
        )
    return canvas
