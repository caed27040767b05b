"""A small dataset of one's own, written by the tests: images and label maps in a folder layout, with the
mistakes a real folder has (files without a partner, a stray label value).

The scenes are learnable: a background and one or two shapes, each class with its own colour (plus noise),
so a tiny model fine-tuned for a few iterations already separates them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

# class -> BGR colour of its pixels (background, then the "toppings")
COLOURS = ((40, 40, 40), (60, 20, 220), (0, 160, 0))
CLASSES = ("background", "ham", "olive")


@dataclass(frozen=True)
class OwnDataset:
    """What :func:`write_ade_layout` wrote."""

    root: Path
    bad_label: Path  # the label map holding the stray value
    bad_value: int
    bad_pixels: int
    image_without_label: str
    label_without_image: str


def _scene(rng: np.random.Generator, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    height, width = size
    label = np.zeros((height, width), dtype=np.uint8)
    for cls in rng.permutation([1, 2])[: int(rng.integers(1, 3))]:
        h, w = int(rng.integers(height // 4, height // 2)), int(rng.integers(width // 4, width // 2))
        y, x = int(rng.integers(0, height - h)), int(rng.integers(0, width - w))
        label[y : y + h, x : x + w] = cls
    image = np.array(COLOURS, dtype=np.float32)[label] + rng.normal(0, 8, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8), label


def write_ade_layout(
    root: Path, *, num_train: int = 6, num_val: int = 3, size: tuple[int, int] = (48, 64), seed: int = 0
) -> OwnDataset:
    """``root/images/{training,validation}/*.jpg`` and ``root/annotations/{training,validation}/*.png`` (mode L,
    values 0 background, 1 ham, 2 olive), plus an image without a label map (training), a label map without an
    image (validation) and one label map with a stray value 7 on a small patch."""
    rng = np.random.default_rng(seed)
    for split, folder, count in (("train", "training", num_train), ("val", "validation", num_val)):
        (root / "images" / folder).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / folder).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            image, label = _scene(rng, size)
            stem = f"{split}_{index:03d}"
            cv2.imwrite(str(root / "images" / folder / f"{stem}.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 95])
            Image.fromarray(label, mode="L").save(root / "annotations" / folder / f"{stem}.png")
    lonely_image, _ = _scene(rng, size)
    cv2.imwrite(str(root / "images" / "training" / "no_label.jpg"), lonely_image)
    _, lonely_label = _scene(rng, size)
    Image.fromarray(lonely_label, mode="L").save(root / "annotations" / "validation" / "no_image.png")
    bad = root / "annotations" / "training" / "train_001.png"
    label = np.array(Image.open(bad))
    label[:3, :4] = 7
    Image.fromarray(label, mode="L").save(bad)
    return OwnDataset(root, bad, 7, 12, "no_label.jpg", "no_image.png")
