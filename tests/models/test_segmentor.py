"""Tiny versions of every built zoo entry: forward, backward, losses, input-size rules, checkpointing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import models
from micro_params import tiny_model
from models.losses import seg_cross_entropy

NUM_CLASSES = 7
NO_DROP = {"drop_path_rate": 0.0, "decode_head.dropout_ratio": 0.0, "auxiliary_head.dropout_ratio": 0.0}


def _tiny(name: str, overrides: dict | None = None):
    """The tiny preset of ``name`` with 7 classes (a model test: no dataset involved)."""
    return tiny_model(name, overrides, num_classes=NUM_CLASSES)


SIZE = 64


def _perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Move every parameter off its (possibly zero) initial value so every path carries gradient."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)


def _batch(batch: int = 2, size: int = SIZE, num_classes: int = 7, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    img = torch.randn(batch, 3, size, size, generator=gen)
    labels = torch.randint(0, num_classes, (batch, size, size), generator=gen)
    labels[:, :4] = 255  # some ignored pixels
    return img, labels


@pytest.mark.parametrize("name", models.list_configs(head="upernet"))
def test_tiny_forward_backward_reaches_every_parameter(name: str) -> None:
    # no stochastic depth / dropout: a dropped residual branch legitimately gets no gradient
    model = _tiny(name, NO_DROP)
    _perturb(model)
    img, labels = _batch()
    logits = model(img)
    assert logits.shape == (2, 7, SIZE // 4, SIZE // 4)
    losses = model.loss(img, labels)
    assert set(losses) == {"decode.loss_seg", "decode.acc_seg", "aux.loss_seg", "aux.acc_seg", "loss"}
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None, f"{name}: {pname} got no gradient"
        assert torch.isfinite(param.grad).all(), pname
        assert param.grad.abs().sum() > 0, f"{name}: {pname} got a zero gradient"


def test_predict_is_decode_logits_resized_to_the_input() -> None:
    model = _tiny("upernet_deit_adapter_tiny_512_160k_ade20k").eval()
    img, _ = _batch(batch=1, size=96)
    with torch.no_grad():
        logits = model.predict(img)
        expected = F.interpolate(model(img), size=(96, 96), mode="bilinear", align_corners=False)
    assert logits.shape == (1, 7, 96, 96)
    torch.testing.assert_close(logits, expected)


def test_loss_semantics_sum_over_valid_divided_by_all_pixels() -> None:
    logits = torch.randn(2, 5, 8, 8)
    labels = torch.randint(0, 5, (2, 8, 8))
    labels[0, :4] = 255
    per_pixel = -torch.log_softmax(logits, dim=1).gather(1, labels.clamp(max=4)[:, None])[:, 0]
    valid = labels != 255
    expected = (per_pixel * valid).sum() / labels.numel()
    torch.testing.assert_close(seg_cross_entropy(logits, labels), expected)
    # i.e. not the mean over the valid pixels only
    assert not torch.allclose(seg_cross_entropy(logits, labels), per_pixel[valid].mean())


def test_aux_loss_weight_is_0_4() -> None:
    model = _tiny("upernet_deit_adapter_tiny_512_160k_ade20k", NO_DROP).eval()
    img, labels = _batch()
    with torch.no_grad():
        losses = model.loss(img, labels)
        features = model.extract_features(img)
        aux = F.interpolate(
            model.auxiliary_head(features), size=(SIZE, SIZE), mode="bilinear", align_corners=False
        )
    torch.testing.assert_close(losses["aux.loss_seg"], 0.4 * seg_cross_entropy(aux, labels))
    torch.testing.assert_close(losses["loss"], losses["decode.loss_seg"] + losses["aux.loss_seg"])


@pytest.mark.parametrize(("height", "width"), [(72, 64), (64, 80), (48, 48)])
def test_input_not_multiple_of_32_names_the_size(height: int, width: int) -> None:
    model = _tiny("upernet_deit_adapter_tiny_512_160k_ade20k").eval()
    with pytest.raises(ValueError, match=f"input size {height}x{width} is not a multiple of 32"):
        model(torch.zeros(1, 3, height, width))


def test_beit_input_must_equal_img_size() -> None:
    model = _tiny("upernet_beit_adapter_large_640_160k_ade20k").eval()
    with pytest.raises(ValueError, match="input size 96x96 does not match the BEiT trunk's img_size 64x64"):
        model(torch.zeros(1, 3, 96, 96))


def test_vit_accepts_any_multiple_of_32_non_square() -> None:
    model = _tiny("upernet_augreg_adapter_base_512_160k_ade20k").eval()
    with torch.no_grad():
        features = model.extract_features(torch.randn(1, 3, 96, 160))
    assert [tuple(f.shape[2:]) for f in features] == [(24, 40), (12, 20), (6, 10), (3, 5)]


@pytest.mark.parametrize(
    "name", ["upernet_deit_adapter_tiny_512_160k_ade20k", "upernet_beit_adapter_large_640_160k_ade20k"]
)
def test_gradient_checkpointing_gives_the_same_gradients(name: str) -> None:
    """Recomputing the forward changes only the order in which a parameter's gradient contributions are
    added: in float64 (so that no ReLU tie can flip between the two runs) the gradients agree to a few units
    of float64 rounding of their accumulated magnitude. The bound, ``1e-12`` absolute plus ``1e-9`` relative,
    is above that by orders of magnitude on any machine (u = 1.1e-16, sums of at most ~1e5 terms of size <= the
    gradient's) and far below what a recomputation that differs (dropout drawn twice, a block skipped) gives."""
    grads = []
    for with_cp in (False, True):
        torch.manual_seed(0)
        model = _tiny(name, {**NO_DROP, "backbone.with_cp": with_cp}).double()
        _perturb(model)
        img, labels = _batch()
        model.loss(img.double(), labels)["loss"].backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], atol=1e-12, rtol=1e-9, msg=key)


def test_labels_must_match_images() -> None:
    model = _tiny("upernet_deit_adapter_tiny_512_160k_ade20k")
    img, labels = _batch()
    with pytest.raises(ValueError, match="do not match images"):
        model.loss(img, labels[:, :32])


def test_bf16_autocast_forward_runs() -> None:
    model = _tiny("upernet_deit_adapter_tiny_512_160k_ade20k").eval()
    img, _ = _batch(batch=1)
    with torch.no_grad():
        reference = model(img)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(img)
    assert low.dtype == torch.bfloat16
    assert (low.float() - reference).abs().max() < 0.05 * reference.abs().max() + 0.05
