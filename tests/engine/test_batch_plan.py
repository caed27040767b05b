"""The batch plan keeps the reference's BatchNorm groups on any number of processes; TF32 is a recorded knob."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest
import torch

import models
from pipelines.config.knobs import TrainParams, add_knob_flags, knobs_from_flags, weight_defining_knobs
from pipelines.engine.plan import plan_batch, resolve_plan
from pipelines.engine.precision import apply_tf32
from pipelines.runs.recipe_diff import training_diff

NAME = "upernet_deit_adapter_tiny_512_160k_ade20k"  # 8 GPUs x 2 images
STRATEGY_2 = "mask2former_beit_adapter_large_896_80k_ade20k"  # 16 GPUs x 1 image
OFFICIAL_DATA = {"kind": "official", "archives": [{"file": "ADEChallengeData2016.zip", "sha256": "0" * 64}]}


@pytest.mark.parametrize("name", [NAME, STRATEGY_2])
@pytest.mark.parametrize("world_size", [1, 2, 8, 16])
def test_default_plan_keeps_the_reference_batchnorm_groups(
    name: str, world_size: int, caplog: pytest.LogCaptureFixture
) -> None:
    config = models.get_config(name)
    with caplog.at_level(logging.WARNING):
        plan = plan_batch(config, TrainParams(), world_size)
    # SyncBN spans every process: one BatchNorm group is the whole global batch, as in the reference
    assert plan.accumulation == 1 and plan.global_batch == 16
    assert plan.per_process * world_size == 16
    assert plan.bn_group_size == plan.recipe_bn_group_size == 16
    assert not caplog.records


def test_forced_accumulation_warns_and_is_recorded(caplog: pytest.LogCaptureFixture) -> None:
    config = models.get_config(NAME)
    knobs = TrainParams(batch_size=2)  # the reference's per-GPU batch, on one GPU
    with caplog.at_level(logging.WARNING):
        plan = resolve_plan(config, knobs, world_size=1, work_dir=Path("unused"))
    assert (plan.batch.per_process, plan.batch.accumulation, plan.batch.global_batch) == (2, 8, 16)
    assert plan.batch.bn_group_size == 2
    assert (
        "BatchNorm normalises over 2 images" in caplog.text
        and "reference's SyncBN normalises over 16" in caplog.text
    )
    diff = training_diff(
        config, plan, pretrained={"file": config.pretrained.file}, init_from=None, dataset=OFFICIAL_DATA
    )
    assert diff.keys == ["bn_group", "accumulation", "world_size"]
    bn = diff.deviations[0]
    assert (bn.published, bn.ours) == (16, 2)


def test_no_syncbn_across_cpu_processes_is_a_smaller_group(caplog: pytest.LogCaptureFixture) -> None:
    config = models.get_config(NAME)
    with caplog.at_level(logging.WARNING):
        plan = plan_batch(config, TrainParams(), 2, bn_spans_processes=False)  # gloo on CPU: plain BatchNorm
    assert plan.per_process == 8 and plan.bn_group_size == 8
    assert "no SyncBN across processes here" in caplog.text


def test_one_gpu_with_the_default_plan_is_equivalent_to_eight() -> None:
    config = models.get_config(NAME)
    plan = resolve_plan(config, TrainParams(), world_size=1, work_dir=Path("unused"))
    diff = training_diff(
        config, plan, pretrained={"file": config.pretrained.file}, init_from=None, dataset=OFFICIAL_DATA
    )
    assert diff.comparable, diff.text()
    assert [d.key for d in diff.equivalent] == ["world_size"]


def test_tf32_is_a_weight_defining_knob_with_a_negative_flag() -> None:
    assert TrainParams().tf32 is True and "tf32" in weight_defining_knobs()
    parser = argparse.ArgumentParser()
    add_knob_flags(parser)
    assert knobs_from_flags(parser.parse_args([])).tf32 is True
    assert knobs_from_flags(parser.parse_args(["--no-tf32"])).tf32 is False
    assert knobs_from_flags(parser.parse_args(["--deterministic"])).deterministic is True
    plan = resolve_plan(models.get_config(NAME), TrainParams(tf32=False), world_size=8, work_dir=Path("x"))
    assert plan.tf32 is False


def test_apply_tf32_sets_and_reports_the_flags() -> None:
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        assert apply_tf32(False, torch.device("cpu")) == {"tf32": False, "tf32_effective": False}
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert apply_tf32(True, torch.device("cpu")) == {"tf32": True, "tf32_effective": False}
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
