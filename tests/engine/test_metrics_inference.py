"""Metrics computed by hand and the reference's sliding-window grid."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipelines.engine.inference import slide_inference, slide_windows, to_probabilities
from pipelines.engine.metrics import SegMetrics, intersect_and_union


def test_intersect_and_union_by_hand() -> None:
    label = np.array([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 0, 2]])
    inter, union, area_pred, area_label = intersect_and_union(pred, label, num_classes=4)
    # valid pixels: the first 6 (row 1's last two are ignored, their predictions too)
    # class 0: label at (0,0),(0,1); pred at (0,0),(1,1); hit (0,0)
    # class 1: label at (0,2),(0,3); pred at (0,1),(0,2),(0,3); hits 2
    # class 2: label at (1,0),(1,1); pred at (1,0); hit 1
    assert inter.tolist() == [1, 2, 1, 0]
    assert area_pred.tolist() == [2, 3, 1, 0]
    assert area_label.tolist() == [2, 2, 2, 0]
    assert union.tolist() == [3, 3, 2, 0]


def test_out_of_range_label_counts_only_in_union() -> None:
    label = np.array([[7, 0]])
    pred = np.array([[0, 0]])
    inter, union, area_pred, area_label = intersect_and_union(pred, label, num_classes=2)
    assert (inter.tolist(), union.tolist(), area_pred.tolist(), area_label.tolist()) == (
        [1, 0],
        [2, 0],
        [2, 0],
        [1, 0],
    )


def test_metrics_accumulate_over_the_set() -> None:
    metrics = SegMetrics(num_classes=3, class_names=("a", "b", "c"))
    metrics.update(np.array([[0, 0], [1, 1]]), np.array([[0, 1], [1, 1]]))
    metrics.update(np.array([[0, 2]]), np.array([[0, 0]]))
    out = metrics.compute()
    # class 0: I = 1 + 1, U = (2 + 1 - 1) + (1 + 2 - 1) = 4; class 1: I = 2, U = 3; class 2: I = 0, U = 1
    assert out["per_class"]["IoU"] == pytest.approx([50.0, 200 / 3, 0.0])
    assert out["mIoU"] == pytest.approx((50.0 + 200 / 3 + 0.0) / 3)
    assert out["aAcc"] == pytest.approx(100 * 4 / 6)
    # class 2 has no label pixels: its accuracy is NaN and skipped by mAcc
    assert out["per_class"]["Acc"][2] is None
    assert out["mAcc"] == pytest.approx((100 * 2 / 3 + 100 * 2 / 3) / 2)
    assert out["num_images"] == 2


def test_class_absent_everywhere_is_skipped() -> None:
    metrics = SegMetrics(num_classes=3)
    metrics.update(np.array([[0, 1]]), np.array([[0, 1]]))
    out = metrics.compute()
    assert out["per_class"]["IoU"][2] is None and out["mIoU"] == pytest.approx(100.0)


@pytest.mark.parametrize(
    ("size", "crop", "stride", "expected"),
    [
        # ADE20K-like 512 x 683 at crop 512 / stride 341: one row, two columns, the last clamped
        ((512, 683), (512, 512), (341, 341), [(0, 512, 0, 512), (0, 512, 171, 683)]),
        # smaller than the crop: one window spanning the image, never padded
        ((256, 384), (512, 512), (341, 341), [(0, 256, 0, 384)]),
        # Pascal 544 x 736 at 480 / 320: 2 x 2 windows, near-duplicates at the border
        (
            (544, 736),
            (480, 480),
            (320, 320),
            [(0, 480, 0, 480), (0, 480, 256, 736), (64, 544, 0, 480), (64, 544, 256, 736)],
        ),
        # 1024 x 1024 at 512 / 341: grids = (1024 - 512 + 340) // 341 + 1 = 3
        (
            (1024, 1024),
            (512, 512),
            (341, 341),
            [
                (y1, y2, x1, x2)
                for y1, y2 in [(0, 512), (341, 853), (512, 1024)]
                for x1, x2 in [(0, 512), (341, 853), (512, 1024)]
            ],
        ),
    ],
)
def test_window_grid(size, crop, stride, expected) -> None:
    assert slide_windows(*size, crop, stride) == expected


def test_slide_inference_averages_overlaps() -> None:
    img = torch.arange(2 * 6, dtype=torch.float32).reshape(1, 1, 2, 6).expand(1, 3, 2, 6).contiguous()

    def forward(x: torch.Tensor) -> torch.Tensor:  # identity "logits" at full resolution, 2 classes
        return torch.cat([x[:, :1], -x[:, :1]], dim=1)

    out = slide_inference(forward, img, num_classes=2, crop=(2, 4), stride=(2, 2))
    torch.testing.assert_close(out[:, 0], img[:, 0])
    assert math.isclose(out[0, 1, 1, 5].item(), -11.0)


def test_probabilities_flip_back_and_unpad() -> None:
    scores = torch.zeros(1, 2, 4, 6)
    scores[:, 0, :, :1] = 5.0  # class 0 on the left column of the flipped view
    scores[:, :, :, 4:] = -100  # padding to crop away
    probs = to_probabilities(scores, (4, 4), flipped=True, valid_size=(4, 4))
    assert probs.shape == (1, 2, 4, 4)
    assert probs[0, 0, :, 3].min() > 0.99 and probs[0, 0, :, 0].max() < 0.6


def test_evaluation_precision_follows_the_recipe() -> None:
    """docs/reference.md §R2.6: test.py ran DeiT-T/S/B and AugReg-T/B under fp16 autocast (on GPU), the rest in fp32."""
    import models
    from pipelines.engine.evaluator import resolve_precision

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    fp16_rows = [
        n for n in models.list_configs() if resolve_precision(models.get_config(n), "recipe", cuda) == "fp16"
    ]
    assert sorted(fp16_rows) == sorted(
        [
            "upernet_deit_adapter_tiny_512_160k_ade20k",
            "upernet_deit_adapter_small_512_160k_ade20k",
            "upernet_deit_adapter_base_512_160k_ade20k",
            "upernet_augreg_adapter_tiny_512_160k_ade20k",
            "upernet_augreg_adapter_base_512_160k_ade20k",
        ]
    )
    tiny = models.get_config("upernet_deit_adapter_tiny_512_160k_ade20k")
    assert resolve_precision(tiny, "recipe", cpu) == "fp32"
    assert resolve_precision(tiny, "bf16", cuda) == "bf16"
