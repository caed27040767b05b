"""Overrides by dotted path: one checker for the Python API, `--set` and params.yaml (models/overrides.py)."""

from __future__ import annotations

import pytest

import models
from models.overrides import ALIASES, OverrideError, field_paths, resolve_key
from pipelines.cli import main

NAME = "upernet_deit_adapter_tiny_512_160k_ade20k"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # a bare name outside the alias table: rejected with the path it could mean (before: accepted, and
        # evaluation then silently ran whole-image inference for "sliding")
        (
            {"mode": "sliding"},
            r"override 'mode' of \w+ is not a shorthand: write the full path \(data\.eval\.mode\)",
        ),
        (
            {"data.eval.mode": "sliding"},
            r"override data\.eval\.mode='sliding': allowed values are 'slide', 'whole'",
        ),
        ({"eval.mode": "sliding"}, r"allowed values are 'slide', 'whole'"),
        # an int where the crop is (height, width)
        ({"crop_size": 64}, r"override data\.train\.crop_size=64: expected a list \(tuple\[int, int\]\)"),
        ({"crop_size": [64, 64, 3]}, r"expected 2 values"),
        # another dataset with the entry's 150 classes
        (
            {"data.dataset": "pascal_context_59"},
            r"num_classes=150 does not match data\.dataset='pascal_context_59', which has 59 classes",
        ),
        (
            {"data.dataset": "cityscapes"},
            r"allowed values are 'ade20k', 'coco_stuff164k', 'pascal_context_59'",
        ),
        # the fields that identify the entry
        ({"head": "foo"}, r"override 'head' of \w+: head identifies the zoo entry and cannot be overridden"),
        ({"published.miou_ss": 99.0}, r"published\.miou_ss identifies the zoo entry"),
        # bare names that mean several fields
        (
            {"channels": 32},
            r"'channels' of \w+ is ambiguous: write the full path \(decode_head\.channels, auxiliary_head\.channels\)",
        ),
        (
            {"flip": True},
            r"'flip' of \w+ is ambiguous: write the full path \(data\.eval\.ms\.flip, data\.eval\.flip\)",
        ),
        (
            {"img_scale": [128, 64]},
            r"ambiguous: write the full path \(data\.train\.img_scale, data\.eval\.img_scale\)",
        ),
        (
            {"with_cp": True},
            r"'with_cp' of \w+ is not a shorthand: write the full path \(backbone\.with_cp\)",
        ),
        ({"embed_dimm": 3}, r"override 'embed_dimm' of \w+: no such field"),
        (
            {"decode_head.num_queries": 3},
            r"stands for|no such field",
        ),  # a Mask2Former field on a UperNet entry
        ({"embed_dim": 64, "backbone.trunk.embed_dim": 32}, r"both set backbone\.trunk\.embed_dim"),
        ({"deform_attn_backend": "cuda"}, r"allowed values are 'auto', 'pytorch', 'triton'"),
    ],
)
def test_bad_overrides_are_rejected_at_once_naming_path_and_choices(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        models.get_config(NAME, overrides)


def test_the_same_checker_serves_set(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    for item, message in (
        ("mode=sliding", "write the full path (data.eval.mode)"),
        ("crop_size=64", "expected a list"),
        ("channels=8", "is ambiguous"),
        ("data.dataset=pascal_context_59", "which has 59 classes"),
        ("head=foo", "cannot be overridden"),
    ):
        caplog.clear()
        assert main(["configs", "show", NAME, "--set", item]) == 1, item
        assert message in caplog.text, item
    assert main(["configs", "show", NAME, "--set", "eval.mode=whole", "--set", "crop_size=[64, 64]"]) == 0
    shown = capsys.readouterr().out
    assert '"mode": "whole"' in shown


def test_dotted_paths_aliases_and_derived_fields() -> None:
    config = models.get_config(NAME, {"backbone.trunk.embed_dim": 96, "trunk.num_heads": 4, "lr": 1e-3})
    assert (config.backbone.trunk.embed_dim, config.backbone.trunk.num_heads) == (96, 4)
    assert config.optimizer.lr == 1e-3
    cropped = models.get_config(NAME, crop_size=[384, 384])
    assert cropped.data.train.crop_size == cropped.data.eval.crop_size == (384, 384)  # the eval crop follows
    explicit = models.get_config(NAME, {"crop_size": [384, 384], "data.eval.crop_size": [384, 416]})
    assert explicit.data.eval.crop_size == (384, 416)
    beit = models.get_config("mask2former_beit_adapter_large_896_80k_ade20k", crop_size=[640, 640])
    assert beit.backbone.trunk.img_size == 640 and beit.data.eval.ms.pad_short_side == 640
    with pytest.raises(ValueError, match=r"BEiT trunk takes only square 640 inputs .*crop_size=\(512, 512\)"):
        models.get_config(
            "upernet_beit_adapter_large_640_160k_ade20k", {"crop_size": [512, 512], "img_size": 640}
        )
    nested = models.get_config(NAME, {"decode_head": {"channels": 64}, "auxiliary_head": {"channels": 32}})
    assert (nested.decode_head.channels, nested.auxiliary_head.channels) == (64, 32)


def test_every_alias_names_one_path_of_some_entry() -> None:
    paths = {p for name in models.list_configs() for p in field_paths(models.get_config(name))}
    assert set(ALIASES.values()) <= paths
    config = models.get_config(NAME)
    assert resolve_key(config, "trunk.embed_dim") == "backbone.trunk.embed_dim"
    with pytest.raises(OverrideError, match="ambiguous"):
        resolve_key(config, "channels")


def test_preset_then_overrides_field_by_field() -> None:
    tiny = models.get_config("mask2former_beit_adapter_large_896_80k_ade20k", preset="tiny")
    assert tiny.backbone.trunk.embed_dim == 64 and tiny.backbone.trunk.img_size == 64
    changed = models.get_config(
        "mask2former_beit_adapter_large_896_80k_ade20k", {"backbone.trunk.embed_dim": 128}, preset="tiny"
    )
    assert changed.backbone.trunk.embed_dim == 128 and changed.decode_head.num_queries == 16
    with pytest.raises(ValueError, match="unknown preset 'huge'; known presets: tiny"):
        models.get_config(NAME, preset="huge")


# how people write numbers (the reference configs' own lr=6e-5): YAML 1.1 reads these as strings
@pytest.mark.parametrize(
    ("item", "path", "expected"),
    [
        ("lr=6e-5", ("optimizer", "lr"), 6e-5),
        ("lr=1e-4", ("optimizer", "lr"), 1e-4),
        ("lr=1e12", ("optimizer", "lr"), 1e12),
        ("lr=1.0e12", ("optimizer", "lr"), 1e12),
        ("optimizer.weight_decay=1E3", ("optimizer", "weight_decay"), 1e3),
        ("drop_path_rate=.5", ("backbone", "trunk", "drop_path_rate"), 0.5),
        ("lr=1.0e+12", ("optimizer", "lr"), 1e12),  # the one spelling YAML 1.1 reads as a float itself
        ("lr=2", ("optimizer", "lr"), 2.0),
        ("optimizer.betas=[0.9, 9.99e-1]", ("optimizer", "betas"), (0.9, 0.999)),
    ],
)
def test_every_float_field_takes_python_float_literals(
    item: str, path: tuple[str, ...], expected: object
) -> None:
    from pipelines.config.overrides import parse_set_options

    config = models.get_config(NAME, parse_set_options([item]))
    value = config
    for name in path:
        value = getattr(value, name)
    assert value == expected and type(value) is type(expected)
    assert all(type(v) is float for v in (value if isinstance(value, tuple) else (value,)))


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("lr=inf", r"override optimizer\.lr: inf is out of range \(a finite number above 0\)"),
        ("lr=-inf", r"override optimizer\.lr: -inf is out of range"),
        ("lr=nan", r"override optimizer\.lr: nan is out of range"),
        ("lr=.inf", r"override optimizer\.lr: inf is out of range"),  # YAML's own spelling of infinity
        ("lr=0", r"override optimizer\.lr: 0\.0 is out of range \(above 0\)"),
        ("drop_path_rate=1.5", r"drop_path_rate: 1\.5 is out of range \(at least 0 and below 1\)"),
        ("optimizer.betas=[0.9, inf]", r"optimizer\.betas: \(0\.9, inf\) is out of range"),
        ("lr=6e-5x", r"override optimizer\.lr='6e-5x': expected float"),
        ("lr=true", r"override optimizer\.lr=True: expected float"),
    ],
)
def test_non_finite_and_out_of_range_numbers_are_refused(item: str, message: str) -> None:
    from pipelines.config.overrides import parse_set_options

    with pytest.raises(OverrideError, match=message):
        models.get_config(NAME, parse_set_options([item]))


def test_set_on_the_command_line_takes_6e_5(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["configs", "show", NAME, "--set", "lr=6e-5", "--set", "optimizer.weight_decay=5e-2"]) == 0
    shown = capsys.readouterr().out
    assert '"lr": 6e-05' in shown and '"weight_decay": 0.05' in shown


def test_params_yaml_and_the_overrides_check_values_with_one_checker() -> None:
    """pipelines.config.strict (params.yaml, the knob flags) and models.overrides give the same verdict and the
    same message for the same value and type: one checker (models/values.py), two error classes."""
    from typing import Literal

    from models.overrides import check_value
    from pipelines.config.strict import ParamsError, convert

    cases = [
        ("6e-5", float),
        ("fast", float),
        (True, int),
        (3, float),
        ("sliding", Literal["slide", "whole"]),
        ([1, 2, 3], tuple[int, int]),
        ([64, "64"], tuple[int, int]),
        (["ss", "ms"], tuple[Literal["ss", "ms"], ...]),
        (None, int | None),
        ("x", int | None),
    ]
    for value, annotation in cases:
        verdicts = []
        for check, error in ((convert, ParamsError), (check_value, OverrideError)):
            try:
                verdicts.append(("ok", check(value, annotation, "key")))
            except error as err:
                verdicts.append(("refused", str(err)))
        assert verdicts[0] == verdicts[1], (value, annotation, verdicts)
