"""Training and test pipelines: alignment, ignore pixels, padding, determinism, reference scales and views."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from data.eval_transforms import PadShortSide, TestPipeline, setr_rescale
from data.ops import hflip, imrescale
from data.train_transforms import IMAGENET_MEAN, IMAGENET_STD, TrainPipeline, to_mask

COLOURS = np.array([[(37 * c) % 256, (255 - 23 * c) % 256, (91 * c + 40) % 256] for c in range(10)], np.uint8)
BLACK = np.zeros(3, np.uint8)


def _scene(seed: int = 0, height: int = 120, width: int = 160) -> tuple[np.ndarray, np.ndarray]:
    """Blocks of classes 0..9 (20 px) with an ignored band; the image shows each class in its own colour."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 10, (height // 20 + 1, width // 20 + 1)).astype(np.uint8)
    label = np.kron(blocks, np.ones((20, 20), np.uint8))[:height, :width]
    label[50:70, :] = 255
    image = np.where(label[..., None] == 255, BLACK, COLOURS[np.minimum(label, 9)])
    return np.ascontiguousarray(image), np.ascontiguousarray(label)


def _plain(**overrides: object) -> TrainPipeline:
    """A pipeline whose normalisation is the identity, so output pixels are the resized BGR values."""
    options = {
        "scale": (320, 80),
        "crop_size": (64, 64),
        "photometric": None,
        "mean": (0.0,) * 3,
        "std": (1.0,) * 3,
    }
    return TrainPipeline(**{**options, "to_rgb": False, **overrides})


def _assert_aligned(image_chw: np.ndarray, label: np.ndarray) -> int:
    """Away from label boundaries, each pixel has its label's colour; returns the number of pixels checked."""
    image = image_chw.transpose(1, 2, 0)
    eroded_min = cv2.erode(label, np.ones((5, 5), np.uint8))
    eroded_max = cv2.dilate(label, np.ones((5, 5), np.uint8))
    interior = eroded_min == eroded_max
    # the crop's own border saw pixels outside the crop when the image was resized
    interior[:2], interior[-2:], interior[:, :2], interior[:, -2:] = False, False, False, False
    lut = np.zeros((256, 3), np.float32)
    lut[:10] = COLOURS
    np.testing.assert_allclose(image[interior], lut[label[interior]], atol=1.0)
    return int(interior.sum())


@pytest.mark.parametrize("seed", range(8))
def test_image_and_label_stay_aligned(seed: int) -> None:
    image, label = _scene(seed)
    out = _plain()(image, label, np.random.default_rng(seed))
    assert out["image"].shape == (3, 64, 64) and out["image"].dtype == np.float32
    assert out["label"].shape == (64, 64) and out["label"].dtype == np.uint8
    assert _assert_aligned(out["image"], out["label"]) > 200
    assert set(np.unique(out["label"]).tolist()) <= set(np.unique(label).tolist()) | {255}


def test_flip_flips_image_and_label_together() -> None:
    image, label = _scene(3)
    kept = _plain(flip_prob=0.0, scale=(640, 160))(image, label, np.random.default_rng(5))
    flipped = _plain(flip_prob=1.0, scale=(640, 160))(image, label, np.random.default_rng(5))
    np.testing.assert_array_equal(flipped["label"], hflip(kept["label"]))
    np.testing.assert_array_equal(flipped["image"], kept["image"][:, :, ::-1])
    _assert_aligned(flipped["image"], flipped["label"])


def test_ignore_pixels_survive() -> None:
    image, label = _scene(1)
    seen_ignore_inside = 0
    for seed in range(20):
        out = _plain(cat_max_ratio=1.0)(image, label, np.random.default_rng(seed))
        seen_ignore_inside += int((out["label"] == 255).any())
    assert seen_ignore_inside >= 5
    # a nearest-neighbour resize keeps the ignored band as 255 and never invents other values there
    resized = imrescale(label, (640, 240), "nearest")  # x2: the band (rows 50..69) becomes rows 100..139
    assert resized.shape == (240, 320) and (resized[100:140] == 255).all() and (resized[140] != 255).all()
    assert set(np.unique(resized).tolist()) <= set(np.unique(label).tolist())


def test_padding_with_zero_image_and_ignore_label() -> None:
    image, label = _scene(2, height=40, width=50)
    pipeline = TrainPipeline(scale=(100, 20), crop_size=(64, 64), ratio_range=(1.0, 1.0), photometric=None)
    out = pipeline(image, label, np.random.default_rng(0))
    # scale (100, 20): the 40 x 50 image becomes 20 x 25, padded bottom/right to 64 x 64
    assert (out["label"][20:] == 255).all() and (out["label"][:, 25:] == 255).all()
    assert (out["image"][:, 20:] == 0).all() and (out["image"][:, :, 25:] == 0).all()
    assert (out["image"][:, :20, :25] != 0).any()
    assert not (out["label"][:20, :25] == 255).all()


def test_normalisation_uses_the_config_mean_and_std() -> None:
    image = np.full((64, 64, 3), (10, 100, 200), np.uint8)  # BGR
    label = np.zeros((64, 64), np.uint8)
    pipeline = TrainPipeline(scale=(64, 64), crop_size=(64, 64), ratio_range=(1.0, 1.0), photometric=None)
    out = pipeline(image, label, np.random.default_rng(0))
    expected = (np.array([200, 100, 10]) - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)  # RGB
    np.testing.assert_allclose(out["image"][:, 10, 10], expected, rtol=1e-5)


def test_same_seed_same_sample_other_seed_differs() -> None:
    image, label = _scene(4)
    pipeline = TrainPipeline(scale=(320, 80), crop_size=(64, 64), to_mask=True)
    first = pipeline(image, label, np.random.default_rng(11))
    again = pipeline(image, label, np.random.default_rng(11))
    other = pipeline(image, label, np.random.default_rng(12))
    for key in ("image", "label", "gt_labels", "gt_masks"):
        np.testing.assert_array_equal(first[key], again[key])
    assert not np.array_equal(first["image"], other["image"])


def test_to_mask_targets() -> None:
    label = np.array([[3, 3, 255], [7, 3, 7]], np.uint8)
    targets = to_mask(label)
    np.testing.assert_array_equal(targets["gt_labels"], [3, 7])
    assert targets["gt_labels"].dtype == np.int64 and targets["gt_masks"].dtype == bool
    np.testing.assert_array_equal(targets["gt_masks"][0], label == 3)
    np.testing.assert_array_equal(targets["gt_masks"][1], label == 7)
    assert to_mask(np.full((2, 2), 255, np.uint8))["gt_masks"].shape == (0, 2, 2)


def test_invalid_specs_are_rejected() -> None:
    with pytest.raises(ValueError, match="cat_max_ratio"):
        TrainPipeline(scale=(2048, 512), crop_size=(512, 512), cat_max_ratio=0.0)
    with pytest.raises(ValueError, match="setr"):
        TestPipeline(scale=(2048, 640), resize_mode="setr", crop_size=640)  # setr has no ResizeToMultiple


def _short_sides(pipeline: TestPipeline, height: int, width: int) -> list[int]:
    image = np.zeros((height, width, 3), np.uint8)
    return [min(v.img_shape) for v in pipeline.views(image) if not v.flip]


def test_single_scale_view_is_two_uint8_resizes() -> None:
    image = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    pipeline = TestPipeline(scale=(2048, 512))
    (view,) = pipeline.views(image)
    assert view.image.shape == (3, 512, 704) and view.img_shape == (512, 704) and not view.flip
    twice = cv2.resize(cv2.resize(image, (683, 512), interpolation=cv2.INTER_LINEAR), (704, 512))
    expected = ((twice[..., ::-1].astype(np.float64) - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)
    np.testing.assert_allclose(view.image, expected, atol=1e-5)


def test_aug_test_scales_and_flip_order() -> None:
    pipeline = TestPipeline(scale=(2048, 512), ratios=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75), flip=True)
    assert pipeline.num_views == 12
    assert _short_sides(pipeline, 512, 683) == [256, 384, 512, 640, 768, 896]
    views = pipeline.views(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    assert [v.flip for v in views[:4]] == [False, True, False, True]
    np.testing.assert_array_equal(views[1].image, views[0].image[:, :, ::-1])
    assert all(v.image.shape[1] % 32 == 0 and v.image.shape[2] % 32 == 0 for v in views)


def test_beit_896_scales() -> None:
    three = TestPipeline(scale=(3584, 896), ratios=(0.7143, 0.8571, 1.0), flip=True)
    assert _short_sides(three, 896, 1195) == [640, 768, 896]
    four = TestPipeline(scale=(3584, 896), ratios=(0.8929, 0.9286, 0.9643, 1.0), flip=True)
    assert _short_sides(four, 896, 1195) == [800, 832, 864, 896]


def test_setr_resize_scales() -> None:
    ratios = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    pascal = TestPipeline(
        scale=(4096, 520), ratios=ratios, flip=True, resize_mode="setr", size_divisor=None, crop_size=480
    )
    assert _short_sides(pascal, 375, 500) == [480, 480, 520, 650, 780, 910]
    ade = TestPipeline(
        scale=(2048, 640), ratios=ratios, flip=True, resize_mode="setr", size_divisor=None, crop_size=640
    )
    assert _short_sides(ade, 512, 683) == [640, 640, 640, 800, 960, 1120]
    # no long-side cap and no rounding to a multiple of 32; portrait images keep their orientation
    assert setr_rescale(np.zeros((500, 100, 3), np.uint8), (4096, 520), 480).shape == (2600, 520, 3)
    assert setr_rescale(np.zeros((375, 500, 3), np.uint8), (2048, 260), 480).shape == (480, 640, 3)


def test_pad_short_side_before_and_after_normalize() -> None:
    image = np.full((100, 150, 3), 255, np.uint8)
    before = TestPipeline(scale=(3584, 64), pad_short_side=PadShortSide(96, "before_normalize"))
    (view,) = before.views(image)
    assert view.img_shape == (64, 96) and view.image.shape == (3, 96, 96)
    raw_zero = (0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(view.image[:, 80, 10], raw_zero, rtol=1e-5)  # padded rows: raw black
    after = TestPipeline(scale=(3584, 64), pad_short_side=PadShortSide(96, "after_normalize"))
    (view,) = after.views(image)
    assert view.img_shape == (64, 96) and (view.image[:, 64:] == 0).all()
    assert (view.image[:, :64] > 1).all()
