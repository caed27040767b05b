"""ONNX export (``vitadapter export onnx``) against PyTorch, and ``vitadapter predict --onnx`` (the host loop)."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import models
from micro_params import tiny_config
from models.checkpoint import load_checkpoint_file
from parity_runs import AttentionMaskPins
from pipelines.cli import main
from pipelines.config.specs import test_pipeline as evaluation_pipeline
from pipelines.engine.checkpoints import save_checkpoint_file
from pipelines.engine.onnx_session import OnnxSegmentor
from pipelines.engine.views import InferenceSettings, predict_probabilities
from pipelines.runs.onnx_export import export_onnx
from rounding import LAMBDA, forward_spreads

pytest.importorskip("onnxruntime")

UPERNET = "upernet_deit_adapter_tiny_512_160k_ade20k"
MASK2FORMER = "mask2former_beit_adapter_large_896_80k_ade20k"
log = logging.getLogger(__name__)


def _trained_like(name: str, seed: int) -> tuple[torch.nn.Module, dict]:
    """The tiny model with every parameter moved off its initialisation (zero-initialised gates opened)."""
    torch.manual_seed(seed)
    model = models.build_segmentor(tiny_config(name))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model.eval(), models.zoo.resolved_overrides(name, {}, preset="tiny")


def _exact_scores(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Exact arithmetic's scores (the model in float64) and float32's emulated rounding spread of them.

    For Mask2Former the attention masks are exact arithmetic's in every emulated run (rounding alone), and no
    mask logit may lie within float32's band of the threshold: then every correct float32 implementation
    (onnxruntime's and PyTorch's) blocks the same entries, and the spread bounds both.
    """
    model64 = copy.deepcopy(model).double()
    head = model64.decode_head
    pins = AttentionMaskPins() if hasattr(head, "_predict") else None
    recorded: list[bool] = []

    def compute() -> dict[str, torch.Tensor]:
        if pins is None:
            return {"scores": model64.predict(images.double())}
        with pins.patched(head, impose=bool(recorded)):
            scores = model64.predict(images.double())
        recorded.append(True)
        return {"scores": scores, **{f"mask_logits.{i}": m for i, m in enumerate(pins.logits)}}

    exact, spreads = forward_spreads(compute)
    for key, spread in spreads.items():
        if key.startswith("mask_logits."):
            band = LAMBDA * spread["element"]
            assert exact[key].abs().min() > band, f"{key}: an attention-mask logit within {band:.2g} of 0"
    return exact["scores"], spreads["scores"]


def _compare(model: torch.nn.Module, onnx_file: Path, images: torch.Tensor) -> float:
    """onnxruntime and PyTorch (float32) each within float32's rounding of the exact scores (LAMBDA sigma,
    tests/rounding.py); their argmax maps equal except at pixels whose exact top-2 scores tie (within twice
    the largest element's band). Returns the largest difference of the two, for the log."""
    exact, spread = _exact_scores(model, images)
    with torch.no_grad():
        expected = model.predict(images)
    got = OnnxSegmentor([onnx_file])(images)
    assert got.shape == expected.shape == exact.shape
    for label, scores in (("onnxruntime", got), ("pytorch", expected)):
        error = (scores.double() - exact).norm().item()
        assert error <= LAMBDA * spread["norm"], (
            f"{label}: {error:.3g} from exact > {LAMBDA * spread['norm']:.3g}"
        )
    top = exact.topk(2, dim=1).values
    ties = (top[:, 0] - top[:, 1]) <= 2 * LAMBDA * spread["element"]
    differ = got.argmax(dim=1) != expected.argmax(dim=1)
    assert not (differ & ~ties).any(), (
        f"argmax differs at {int((differ & ~ties).sum())} pixels that do not tie"
    )
    return float((got - expected).abs().max())


@pytest.fixture(scope="module")
def upernet_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, overrides = _trained_like(UPERNET, seed=0)
    path = tmp_path_factory.mktemp("upernet") / "tiny.pth"
    return save_checkpoint_file(
        {"config": UPERNET, "overrides": overrides, "state_dict": model.state_dict()}, path
    )


def test_upernet_non_square_dynamic_batch(tmp_path: Path) -> None:
    model, overrides = _trained_like(UPERNET, seed=1)
    exported = export_onnx(
        model,
        tiny_config(UPERNET),
        tmp_path / "m.onnx",
        overrides=overrides,
        size=(64, 96),
        dynamic_batch=True,
    )
    assert exported.size == (64, 96) and exported.dynamic_batch
    torch.manual_seed(2)
    diff = _compare(model, exported.path, torch.randn(2, 3, 64, 96))
    log.info("UperNet 64x96, batch 2: max abs diff %.3g", diff)
    # the model is left as it was: its own backend and mode, and it still runs eagerly
    assert model.backbone.interactions[0].injector.attn.backend == "auto"
    with pytest.raises(ValueError, match="the ONNX exports take 64x96 inputs, this window/image is 64x64"):
        OnnxSegmentor([exported.path])(torch.zeros(1, 3, 64, 64))


def test_mask2former_beit(tmp_path: Path) -> None:
    model, overrides = _trained_like(MASK2FORMER, seed=3)
    config = tiny_config(MASK2FORMER)
    with pytest.raises(ValueError, match="does not match the BEiT trunk's img_size 64x64"):
        export_onnx(model, config, tmp_path / "bad.onnx", size=(64, 96))
    # without the exporter's graph optimisation (half the export time; the UperNet tests cover it)
    exported = export_onnx(model, config, tmp_path / "m2f.onnx", overrides=overrides, optimize=False)
    assert exported.size == (64, 64) and exported.metadata["vitadapter.output"] == "semantic_scores"
    torch.manual_seed(4)
    diff = _compare(model, exported.path, torch.randn(1, 3, 64, 64))
    log.info("Mask2Former BEiT 64x64: max abs diff %.3g", diff)


def test_cli_export_and_slide_predict_match_pytorch(
    upernet_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # no NAME: the training checkpoint records its zoo entry (and its overrides)
    onnx_file = tmp_path / "tiny.onnx"
    assert main(["export", "onnx", "--checkpoint", str(upernet_checkpoint), "--out", str(onnx_file)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["vitadapter.zoo_entry"] == UPERNET and printed["input_size"] == [64, 64]
    assert printed["opset"] == 18
    # whole-image scores at the window size
    model = models.build_segmentor(tiny_config(UPERNET))
    model.load_state_dict(load_checkpoint_file(upernet_checkpoint)["state_dict"])
    torch.manual_seed(5)
    _compare(model.eval(), onnx_file, torch.randn(1, 3, 64, 64))
    # an odd-size image through the reference protocol (resize, sliding windows, averaging) both ways
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 256, (75, 101, 3), dtype=np.uint8), (0, 0), 3)
    cv2.imwrite(str(tmp_path / "odd.png"), image)
    ours, theirs = tmp_path / "onnx", tmp_path / "torch"
    assert main(["predict", "--onnx", str(onnx_file), "--out", str(ours), str(tmp_path / "odd.png")]) == 0
    assert (
        main(
            [
                "predict",
                UPERNET,
                "--checkpoint",
                str(upernet_checkpoint),
                "--deform-attn-backend",
                "pytorch",
                "--out",
                str(theirs),
                str(tmp_path / "odd.png"),
            ]
        )
        == 0
    )
    got = cv2.imread(str(ours / "odd.png"), cv2.IMREAD_UNCHANGED)
    expected = cv2.imread(str(theirs / "odd.png"), cv2.IMREAD_UNCHANGED)
    assert got.shape == expected.shape == (75, 101)
    differ = got != expected
    if differ.any():  # only where exact arithmetic's top two probabilities tie (within twice their band)
        config = tiny_config(UPERNET)
        model64 = copy.deepcopy(model).double()
        pipeline, settings = evaluation_pipeline(config, "ss"), InferenceSettings.from_config(config)

        def compute() -> dict[str, torch.Tensor]:
            probs = predict_probabilities(
                lambda x: model64(x.double()), image, pipeline, settings, num_classes=config.num_classes,
                device=torch.device("cpu"),
            )  # fmt: skip
            return {"probs": probs}

        exact, spreads = forward_spreads(compute)
        top = exact["probs"].topk(2, dim=0).values
        ties = ((top[0] - top[1]) <= 2 * LAMBDA * spreads["probs"]["element"]).numpy()
        assert not (differ & ~ties).any(), f"the maps differ at {int((differ & ~ties).sum())} non-tie pixels"
    assert len(np.unique(expected)) > 1  # a map with structure, not one class everywhere
    assert (ours / "odd_overlay.png").is_file()


def test_predict_onnx_errors(
    upernet_checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    image = tmp_path / "a.png"
    cv2.imwrite(str(image), np.zeros((64, 64, 3), np.uint8))
    assert main(["predict", "--out", str(tmp_path / "o"), str(image)]) == 1
    assert "give either --checkpoint or --onnx" in caplog.text
    assert (
        main(["predict", "--onnx", str(tmp_path / "missing.onnx"), "--out", str(tmp_path / "o"), str(image)])
        == 1
    )
    assert "no such ONNX file" in caplog.text
    (tmp_path / "foreign.onnx").write_bytes(b"not a model")
    assert (
        main(["predict", "--onnx", str(tmp_path / "foreign.onnx"), "--out", str(tmp_path / "o"), str(image)])
        == 1
    )
    assert "not a readable ONNX model" in caplog.text
