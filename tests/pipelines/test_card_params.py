"""A dataset card in params.yaml: checked when loaded, the run built with the card's classes, its training
definition following the card; and fine-tuning refuses a checkpoint of another architecture by key."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import models
from micro_params import micro_params, tiny_model, write_params
from models.checkpoint import CheckpointError
from models.finetune import class_dependent_keys, load_init_checkpoint
from own_data import CLASSES, write_ade_layout
from pipelines.config.params import ParamsError, load_params

ENTRY = "upernet_deit_adapter_tiny_512_160k_ade20k"


def _card(root: Path, **changes: object) -> Path:
    write_ade_layout(root / "toppings", num_train=2, num_val=1, size=(8, 8))
    body = {
        "name": "toppings",
        "classes": list(CLASSES),
        "splits": {
            "train": {"images": "toppings/images/training", "labels": "toppings/annotations/training"},
            "val": {"images": "toppings/images/validation", "labels": "toppings/annotations/validation"},
        },
        **changes,
    }
    (root / "toppings.yaml").write_text(yaml.safe_dump(body))
    return root / "toppings.yaml"


def _params(root: Path, run: dict, dataset: dict | None = None) -> Path:
    tiny = micro_params()["runs"]["tiny"]
    datasets = {"toppings": dataset or {"source": "card", "card": "toppings.yaml"}}
    return write_params(root / "params.yaml", micro_params(datasets=datasets, runs={"own": {**tiny, **run}}))


def test_a_card_run_is_built_with_the_card_classes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _card(tmp_path)
    params = load_params(_params(tmp_path, {"data": "toppings"}))
    run = params.run("own")
    assert run.dataset == "toppings"
    config = run.model_config()
    assert (config.num_classes, config.data.dataset, config.backbone.trunk.embed_dim) == (3, "toppings", 64)
    definition = params.training_definition("own")
    assert definition["data"] == "toppings" and definition["overrides"]["num_classes"] == 3
    # an edited card is another training
    _card(tmp_path, classes=["background", "ham", "black olive"])
    assert load_params(tmp_path / "params.yaml").training_definition("own") != definition


@pytest.mark.parametrize(
    ("run", "dataset", "message"),
    [
        ({"data": "toppings"}, {"source": "card"}, r"datasets\.toppings: source 'card' needs card"),
        (
            {"data": "toppings"},
            {"source": "card", "card": "nope.yaml"},
            r"datasets\.toppings\.card: dataset card nope\.yaml does not exist",
        ),
        ({"data": "pizza"}, None, r"runs\.own\.data: 'pizza' is not listed under datasets"),
        (
            {"data": "toppings", "overrides": {"num_classes": 5}},
            None,
            r"runs\.own\.overrides: .*num_classes=5, but the data are the card toppings \(3\)",
        ),
    ],
)
def test_card_settings_are_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: dict, dataset: dict | None, message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    _card(tmp_path)
    with pytest.raises(ParamsError, match=message):
        load_params(_params(tmp_path, run, dataset))


def test_the_card_key_must_be_the_card_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _card(tmp_path, name="pizza")
    with pytest.raises(ParamsError, match=r"datasets\.toppings: the card toppings\.yaml is named 'pizza'"):
        load_params(_params(tmp_path, {"data": "toppings"}))


def test_fine_tuning_loads_all_but_the_class_layers_and_refuses_other_mismatches() -> None:
    source = tiny_model(ENTRY)  # 150 classes
    config = models.get_config(ENTRY, preset="tiny")
    target_config = type(config)(**{**config.__dict__, "num_classes": 3})
    target = models.build_segmentor(target_config)
    report = load_init_checkpoint(
        target, target_config, source.state_dict(), same_classes=False, source="ade.pth"
    )
    assert report.reinitialised == class_dependent_keys(target_config)
    assert all(
        torch.equal(target.state_dict()[k], v) for k, v in source.state_dict().items() if "conv_seg" not in k
    )
    # a mis-shaped entry outside the class layers is another architecture: named, never a silent random init
    wide = {**source.state_dict(), "backbone.level_embed": torch.zeros(3, 128)}
    with pytest.raises(
        CheckpointError, match=r"(?s)not of the same architecture .*shape mismatch .*backbone\.level_embed"
    ):
        load_init_checkpoint(target, target_config, wide, same_classes=False, source="wide.pth")
    state = dict(source.state_dict())
    del state["backbone.level_embed"]
    with pytest.raises(CheckpointError, match=r"(?s)missing \(1\) .*backbone\.level_embed"):
        load_init_checkpoint(target, target_config, state, same_classes=False, source="cut.pth")
    # the same classes (same shapes): every entry is loaded, the class layers too
    same = models.build_segmentor(config)
    kept = load_init_checkpoint(same, config, source.state_dict(), same_classes=True, source="ade.pth")
    assert kept.reinitialised == [] and torch.equal(
        same.decode_head.conv_seg.weight, source.decode_head.conv_seg.weight
    )
