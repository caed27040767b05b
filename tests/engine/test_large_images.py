"""Prediction memory bounded by the image, not by classes x pixels (a 12-megapixel photo used to need ~15 GB)."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import models
from pipelines.config import specs
from pipelines.engine.checkpoints import save_checkpoint_file
from pipelines.engine.labels import predict_labels
from pipelines.engine.views import InferenceSettings, predict_probabilities

UPERNET = "upernet_deit_adapter_tiny_512_160k_ade20k"
M2F = "mask2former_beit_adapter_large_640_160k_ade20k"


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, size=(max(height // 16, 2), max(width // 16, 2), 3), dtype=np.uint8)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)  # smooth regions, not noise


@pytest.mark.parametrize(("name", "mode"), [(UPERNET, "ss"), (UPERNET, "ms"), (M2F, "ss")])
def test_chunked_labels_equal_the_reference_argmax(name: str, mode: str) -> None:
    torch.manual_seed(0)
    model = models.create_segmentor(name, preset="tiny").eval()
    config = models.get_config(name, preset="tiny")
    pipeline, settings = specs.test_pipeline(config, mode), InferenceSettings.from_config(config)
    image = _image(120, 170, seed=1)
    common = {"num_classes": config.num_classes, "device": torch.device("cpu")}
    reference = predict_probabilities(model, image, pipeline, settings, **common).argmax(dim=0).numpy()
    dense = predict_labels(model, image, pipeline, settings, **common)
    chunked = predict_labels(model, image, pipeline, settings, dense_limit=0, **common)
    assert np.array_equal(dense, reference)  # small images: the reference path itself
    assert np.array_equal(chunked, reference)  # the chunked path gives the same labels


@pytest.mark.slow  # about 1-3 minutes on 2 cores; the result is recorded in benchmarks/large_images/
def test_a_12_megapixel_photo_predicts_within_4_gb(tmp_path: Path) -> None:
    """The real `vitadapter predict` on a 4000 x 3000 photo at the ADE20K test scale (2048, 512), 150 classes."""
    photo = tmp_path / "photo.jpg"
    cv2.imwrite(str(photo), _image(3000, 4000))
    peaks = {}
    for name in (UPERNET, M2F):
        checkpoint = save_checkpoint_file(
            {"state_dict": models.create_segmentor(name, preset="tiny").state_dict()},
            tmp_path / f"{name}.pth",
        )
        script = (
            "import resource, sys\nfrom pipelines.cli import main\ncode = main(sys.argv[1:])\n"
            "print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\nsys.exit(code)"
        )
        args = ["predict", name, str(photo), "--checkpoint", str(checkpoint), "--out", str(tmp_path / name)]
        args += ["--preset", "tiny", "--set", "data.eval.img_scale=[2048, 512]"]
        done = subprocess.run(
            [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stderr[-3000:]
        peaks[name] = int(done.stdout.split("PEAK_KB")[-1]) / 2**20  # GiB
        pred = cv2.imread(str(tmp_path / name / "photo.png"), cv2.IMREAD_UNCHANGED)
        assert pred.shape == (3000, 4000) and pred.max() < 150
    print("PEAKS_GIB", peaks)
    assert max(peaks.values()) < 4.0, peaks
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20 < 4.0  # this process held nothing big
