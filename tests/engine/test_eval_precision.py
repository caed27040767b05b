"""fp16 evaluation as the reference's test.py ran it, mmcv's Normalize, and a model that runs in float64.

docs/reference.md §R2.7: under fp16 autocast the deformable-attention core runs in float32 (the reference's
``custom_fwd(cast_inputs=torch.float32)``), the sliding-window canvas, the count and both resizes stay in
float16 (mmseg's canvas is ``new_zeros`` of the half-precision image) and only the softmax is float32;
Normalize rounds mean and std to float32 first.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data.ops import imnormalize
from data.train_transforms import IMAGENET_MEAN, IMAGENET_STD
from micro_params import tiny_model
from models.adapter import ms_deform_attn as msda_module
from models.adapter.deform_inputs import deform_inputs
from models.adapter.ms_deform_attn import MSDeformAttn
from pipelines.engine.inference import slide_inference, to_probabilities


def _mmseg_slide_fp16(forward, img: torch.Tensor, crop: int, stride: int, classes: int) -> torch.Tensor:
    """mmseg 0.20.2's ``slide_inference`` with a half-precision image, window by window, as written there."""
    _, _, h_img, w_img = img.shape
    preds = img.new_zeros((1, classes, h_img, w_img))
    count_mat = img.new_zeros((1, 1, h_img, w_img))
    h_grids = max(h_img - crop + stride - 1, 0) // stride + 1
    w_grids = max(w_img - crop + stride - 1, 0) // stride + 1
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1, x1 = h_idx * stride, w_idx * stride
            y2, x2 = min(y1 + crop, h_img), min(x1 + crop, w_img)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            crop_img = img[:, :, y1:y2, x1:x2]
            logit = F.interpolate(
                forward(crop_img), size=crop_img.shape[2:], mode="bilinear", align_corners=False
            )
            preds += F.pad(logit, (int(x1), int(preds.shape[3] - x2), int(y1), int(preds.shape[2] - y2)))
            count_mat[:, :, y1:y2, x1:x2] += 1
    return preds / count_mat


def test_slide_inference_keeps_the_reference_fp16_canvas() -> None:
    weight = torch.randn(5, 3, 1, 1, generator=torch.Generator().manual_seed(0)).half()

    def forward(x: torch.Tensor) -> torch.Tensor:  # a half-precision "network" at 1/4 resolution
        return F.conv2d(F.avg_pool2d(x.half(), 4), weight) * 3.7

    img = torch.randn(1, 3, 96, 160, generator=torch.Generator().manual_seed(1))
    ours = slide_inference(forward, img, num_classes=5, crop=(64, 64), stride=(40, 40), batch_windows=1)
    ref = _mmseg_slide_fp16(forward, img.half(), 64, 40, 5)
    assert ours.dtype == torch.float16
    assert torch.equal(ours, ref)
    probs = to_probabilities(ours, (100, 170), flipped=False)
    expected = (
        F.interpolate(ref, size=(100, 170), mode="bilinear", align_corners=False).float().softmax(dim=1)
    )
    assert probs.dtype == torch.float32 and torch.equal(probs, expected)
    # a float32 canvas would differ: the fp16 accumulation is what the reference measured
    wide = _mmseg_slide_fp16(lambda x: forward(x).float(), img, 64, 40, 5)
    assert not torch.equal(ours.float(), wide)


def test_deformable_attention_core_in_float32_under_fp16_autocast(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=4)
    with torch.no_grad():
        for param in attn.parameters():
            param.add_(0.1 * torch.randn_like(param))
    injector, _ = deform_inputs(64, 64)
    seen = {}
    real = msda_module.ms_deform_attn

    def spy(value, shapes, locations, weights, *, backend):
        seen.update(value=value, locations=locations, weights=weights)
        return real(value, shapes, locations, weights, backend=backend)

    monkeypatch.setattr(msda_module, "ms_deform_attn", spy)
    query = torch.randn(2, 16, 32)
    features = torch.randn(2, sum(h * w for h, w in injector.spatial_shapes), 32)
    with torch.autocast("cpu", dtype=torch.float16):
        out = attn(query, injector.reference_points, features, injector.spatial_shapes)
        offsets = attn.sampling_offsets(query).view(2, 16, 4, 3, 4, 2)
    assert {seen[k].dtype for k in seen} == {torch.float32}
    assert out.dtype == torch.float16  # output_proj under autocast, as the reference
    # the reference divides the fp16 offsets by the level sizes in fp16, then adds the float32 points
    sizes = torch.tensor([[w, h] for h, w in injector.spatial_shapes], dtype=torch.float16)
    expected = (
        injector.reference_points[:, :, None, :, None, :]
        + (offsets / sizes[None, None, None, :, None]).float()
    )
    assert torch.equal(seen["locations"], expected)
    torch.testing.assert_close(seen["weights"].sum(dim=(-1, -2)), torch.ones(2, 16, 4))


def test_normalize_rounds_mean_and_std_to_float32_as_mmcv() -> None:
    image = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    # mmcv 1.4.2: Normalize stores np.array(mean, dtype=np.float32); imnormalize_ widens to float64
    mean = np.float64(np.array(IMAGENET_MEAN, dtype=np.float32).reshape(1, -1))
    stdinv = 1 / np.float64(np.array(IMAGENET_STD, dtype=np.float32).reshape(1, -1))
    expected = image.astype(np.float32)
    cv2.cvtColor(expected, cv2.COLOR_BGR2RGB, expected)
    cv2.subtract(expected, mean, expected)
    cv2.multiply(expected, stdinv, expected)
    ours = imnormalize(image, IMAGENET_MEAN, IMAGENET_STD)
    assert ours.dtype == np.float32 and np.array_equal(ours, expected)


@pytest.mark.parametrize(
    "name",
    ["upernet_deit_adapter_tiny_512_160k_ade20k", "mask2former_beit_adapter_base_480_40k_pascal_context_59"],
)
def test_the_model_runs_in_float64_end_to_end(name: str) -> None:
    torch.manual_seed(0)
    model = tiny_model(name, {"drop_path_rate": 0.0}, num_classes=5).double().train()
    labels = torch.randint(0, 5, (2, 64, 64))
    labels[:, :8, :8] = 255
    losses = model.loss(torch.randn(2, 3, 64, 64, dtype=torch.float64), labels)
    assert losses["loss"].dtype == torch.float64
    losses["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and {g.dtype for g in grads} == {torch.float64}
