"""Reference-exact primitive operations (mmcv 1.4.2 / mmseg 0.20.2 facts from docs/reference.md §R3 and §P7)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from data.ops import (
    PhotoMetricDistortion,
    imnormalize,
    impad,
    imrescale,
    random_crop_box,
    random_scale,
    rescale_size,
    resize_to_multiple,
)


def _convert(image: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """The reference's per-pixel ``convert``: float32, multiply-add, clip, truncate."""
    return np.clip(image.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def _reference_distortion(
    image: np.ndarray, rng: np.random.Generator, op: PhotoMetricDistortion
) -> np.ndarray:
    """mmseg's PhotoMetricDistortion written out per pixel, drawing from ``rng`` in the reference's order."""
    if rng.integers(2):
        image = _convert(image, beta=rng.uniform(-op.brightness_delta, op.brightness_delta))
    mode = rng.integers(2)

    def contrast(img: np.ndarray) -> np.ndarray:
        return _convert(img, alpha=rng.uniform(*op.contrast_range)) if rng.integers(2) else img

    if mode == 1:
        image = contrast(image)
    if rng.integers(2):
        hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
        hsv[:, :, 1] = _convert(hsv[:, :, 1], alpha=rng.uniform(*op.saturation_range))
        image = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    if rng.integers(2):
        hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
        hsv[:, :, 0] = (hsv[:, :, 0].astype(int) + rng.integers(-op.hue_delta, op.hue_delta)) % 180
        image = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    if mode == 0:
        image = contrast(image)
    return image


def test_rescale_size_rounds_halves_up() -> None:
    # docs/reference.md §P7.3: 683 x 1.5 = 1024.5 becomes 1025 (Python's round() would give 1024)
    assert rescale_size(512, 683, (2048, 768)) == (768, 1025)
    # short side to 512 unless the long side would exceed 2048
    assert rescale_size(300, 400, (2048, 512)) == (512, 683)
    assert rescale_size(100, 1000, (2048, 512)) == (205, 2048)
    assert imrescale(np.zeros((300, 400, 3), np.uint8), (2048, 512)).shape == (512, 683, 3)


def test_resize_to_multiple_is_a_second_separate_resize() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    first = imrescale(image, (2048, 512))
    assert first.shape == (512, 683, 3)
    final = resize_to_multiple(first, 32)
    assert final.shape == (512, 704, 3)  # stretched, not padded
    np.testing.assert_array_equal(final, cv2.resize(first, (704, 512), interpolation=cv2.INTER_LINEAR))
    direct = cv2.resize(image, (704, 512), interpolation=cv2.INTER_LINEAR)
    assert np.abs(final.astype(int) - direct.astype(int)).max() > 0  # one direct resize differs
    assert resize_to_multiple(final, 32).shape == final.shape


def test_imnormalize_rgb_order_and_values() -> None:
    image = np.zeros((2, 2, 3), np.uint8)
    image[..., 0] = 10  # blue
    image[..., 2] = 200  # red
    mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
    out = imnormalize(image, mean, std)
    assert out.dtype == np.float32
    expected = (np.array([200, 0, 10], np.float64) - mean) / std
    np.testing.assert_allclose(out[0, 0], expected, rtol=1e-6)
    np.testing.assert_allclose(
        imnormalize(image, mean, std, to_rgb=False)[0, 0, 0], (10 - 123.675) / 58.395, rtol=1e-6
    )


def test_impad_bottom_right() -> None:
    image = np.ones((2, 3), np.uint8)
    padded = impad(image, 4, 5, 255)
    assert padded.shape == (4, 5) and (padded[:2, :3] == 1).all() and (padded[2:] == 255).all()
    assert (padded[:, 3:] == 255).all()
    with pytest.raises(ValueError, match="cannot pad"):
        impad(image, 1, 5, 0)


def test_random_scale_range() -> None:
    rng = np.random.default_rng(0)
    scales = [random_scale((2048, 512), (0.5, 2.0), rng) for _ in range(500)]
    shorts = np.array([s[1] for s in scales])
    assert shorts.min() >= 256 and shorts.max() <= 1024 and shorts.max() - shorts.min() > 600
    ratio = np.random.default_rng(1).random() * 1.5 + 0.5
    assert random_scale((2048, 512), (0.5, 2.0), np.random.default_rng(1)) == (
        int(2048 * ratio),
        int(512 * ratio),
    )


@pytest.mark.parametrize("seed", range(6))
def test_photometric_distortion_equals_the_per_pixel_reference(seed: int) -> None:
    image = np.random.default_rng(100 + seed).integers(0, 256, (31, 45, 3), dtype=np.uint8)
    op = PhotoMetricDistortion()
    ours = op(image, np.random.default_rng(seed))
    reference = _reference_distortion(image, np.random.default_rng(seed), op)
    np.testing.assert_array_equal(ours, reference)


def test_photometric_distortion_changes_images_and_keeps_dtype() -> None:
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    outputs = [PhotoMetricDistortion()(image, np.random.default_rng(s)) for s in range(8)]
    assert all(o.dtype == np.uint8 and o.shape == image.shape for o in outputs)
    assert sum(not np.array_equal(o, image) for o in outputs) >= 6


def _mmseg_crop_loop(
    label: np.ndarray, crop: tuple[int, int], rng: np.random.Generator, ratio: float
) -> tuple:
    """mmseg RandomCrop's loop, written from its description with np.unique."""

    def draw() -> tuple[int, int, int, int]:
        y = int(rng.integers(0, max(label.shape[0] - crop[0], 0) + 1))
        x = int(rng.integers(0, max(label.shape[1] - crop[1], 0) + 1))
        return y, y + crop[0], x, x + crop[1]

    box = draw()
    for _ in range(10):
        values, counts = np.unique(label[box[0] : box[1], box[2] : box[3]], return_counts=True)
        counts = counts[values != 255]
        if len(counts) > 1 and counts.max() / counts.sum() < ratio:
            break
        box = draw()
    return box


def _balanced(label: np.ndarray, box: tuple[int, int, int, int]) -> bool:
    values, counts = np.unique(label[box[0] : box[1], box[2] : box[3]], return_counts=True)
    counts = counts[values != 255]
    return bool(len(counts) > 1 and counts.max() / counts.sum() < 0.75)


def test_crop_respects_cat_max_ratio() -> None:
    label = np.zeros((200, 200), np.uint8)  # class 0 everywhere ...
    label[150:, 150:] = 1  # ... except one corner of class 1
    label[140:150, :] = 255  # and an ignored band
    accepted = plain = 0
    for seed in range(200):
        box = random_crop_box(label, (64, 64), np.random.default_rng(seed), cat_max_ratio=0.75)
        assert box == _mmseg_crop_loop(label, (64, 64), np.random.default_rng(seed), 0.75)
        accepted += _balanced(label, box)
        plain += _balanced(
            label, random_crop_box(label, (64, 64), np.random.default_rng(seed), cat_max_ratio=1.0)
        )
    assert accepted > 3 * max(plain, 1)  # the check makes balanced crops far more likely


def test_crop_of_a_small_image_and_a_single_class_image() -> None:
    label = np.zeros((30, 40), np.uint8)
    assert random_crop_box(label, (64, 64), np.random.default_rng(0), cat_max_ratio=0.75) == (0, 64, 0, 64)
