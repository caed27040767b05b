"""Data of the wrong dataset is an error: `train` and `evaluate` of an ADE20K model on COCO-Stuff or Pascal
Context shards used to succeed and compare the result with ADE20K's published number."""

from __future__ import annotations

from pathlib import Path

import pytest

import models
from data.prepare import prepare_dataset
from data.synthetic import synthesize
from micro_params import cli_model_args
from pipelines.cli import main
from pipelines.engine.checkpoints import save_checkpoint_file

ADE = "upernet_deit_adapter_tiny_512_160k_ade20k"
TWIN = {"num_train": 2, "num_val": 1, "seed": 0, "min_size": 40, "max_size": 64, "num_classes_used": 3}


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shards")
    out = {}
    for dataset in ("coco_stuff164k", "pascal_context_59"):
        twin = synthesize(dataset, root / f"{dataset}_twin", **TWIN)
        out[dataset] = prepare_dataset(dataset, twin.root, root / dataset).root
    return out


@pytest.mark.parametrize(
    ("dataset", "message"),
    [
        (
            "coco_stuff164k",
            "it holds 'coco_stuff164k', the entry is trained and evaluated on 'ade20k'; it has 171 classes, the entry 150",
        ),
        (
            "pascal_context_59",
            "it holds 'pascal_context_59', the entry is trained and evaluated on 'ade20k'; it has 59 classes",
        ),
    ],
)
def test_an_ade20k_model_refuses_other_datasets(
    shards: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture, dataset: str, message: str
) -> None:
    checkpoint = save_checkpoint_file(
        {"state_dict": models.create_segmentor(ADE, preset="tiny").state_dict()}, tmp_path / "model.pth"
    )
    evaluate = [
        "evaluate",
        "--no-tracking",
        ADE,
        "--checkpoint",
        str(checkpoint),
        "--data",
        str(shards[dataset]),
        *cli_model_args(),
    ]
    assert main([*evaluate, "--no-progress"]) == 1
    assert f"{shards[dataset]} does not hold the data of {ADE}: {message}" in caplog.text
    caplog.clear()
    train = [
        "train",
        "--no-tracking",
        ADE,
        "--data",
        str(shards[dataset]),
        "--work-dir",
        str(tmp_path / "run"),
        "--pretrained",
        "none",
    ]
    assert main([*train, *cli_model_args()]) == 1
    assert message in caplog.text
    assert not (tmp_path / "run" / "iter_0000001.pth").exists()
