"""Mask2Former under gradient accumulation: one process with 2 micro-batches equals 2 processes.

The reference divides each GPU's mask and dice terms by the matched masks averaged over the GPUs
(docs/reference.md §R2.4); DDP then averages the gradients, so the step's gradient is (sum of the terms) /
(masks of the global batch). The trainer counts the masks of every micro-batch from the labels before the
forward and normalises each micro-batch by the step's mean count. Here the two "processes" run one after
the other in this process: each computes the reference's loss with the across-process mean count (the
criterion's all-reduce, emulated) and the averaged gradient is DDP's all-reduce mean.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from micro_params import tiny_config
from models.builder import build_segmentor
from models.heads.mask2former import criterion as criterion_module
from pipelines.engine.distributed import DistInfo
from pipelines.engine.plan import BatchPlan, TrainPlan
from pipelines.engine.trainer import Trainer, micro_batch_seed

NAME = "mask2former_beit_adapter_base_480_40k_pascal_context_59"
SIZE = 64
TINY = {
    "decode_head.num_queries": 4,  # image 1 has 5 classes: its count is capped at 4 (min(Q, G))
    "decode_head.num_encoder_layers": 1,
    "decode_head.num_decoder_layers": 2,
    "drop_path_rate": 0.0,
    "decode_head.train_num_points": 1024,  # fewer sampled points: faster, the same arithmetic
}
SEED = 7


def _labels() -> list[torch.Tensor]:
    """Two (1, SIZE, SIZE) label maps: 2 classes, and 5 classes with an ignored corner."""
    first = torch.zeros(1, SIZE, SIZE, dtype=torch.int64)
    first[:, :, SIZE // 2 :] = 3
    second = torch.zeros(1, SIZE, SIZE, dtype=torch.int64)
    for k in range(5):
        second[:, k * SIZE // 5 :, :] = k
    second[:, :8, :8] = 255
    return [first, second]


def _micro_batches() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    return [
        {"image": torch.randn(1, 3, SIZE, SIZE, generator=generator), "label": label} for label in _labels()
    ]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    net = build_segmentor(tiny_config(NAME, TINY, num_classes=5))
    with torch.no_grad():  # off the zero initialisations, so every path carries gradient
        for param in net.parameters():
            param.add_(0.02 * torch.randn_like(param))
    return net.train()


def _trainer_gradients(model: torch.nn.Module, tmp_path: Path, *, step_normaliser: bool) -> dict[str, Any]:
    config = tiny_config(NAME, TINY, num_classes=5)
    plan = TrainPlan(
        entry=config.name,
        work_dir=tmp_path,
        optimizer=config.optimizer,
        schedule=config.schedule,
        batch=BatchPlan(per_process=1, accumulation=2, world_size=1, recipe_global_batch=16),
        seed=SEED,
        progress=False,
    )

    def batches(start: int, batch_size: int, micro_batches: int) -> Iterator[Any]:
        return iter([_micro_batches()])

    trainer = Trainer(copy.deepcopy(model), plan, DistInfo(0, 1, 0, torch.device("cpu")), batches)
    if not step_normaliser:  # each micro-batch normalised by its own count: what accumulation did before
        trainer._step_normaliser = lambda micro_batches: {}
    captured: dict[str, torch.Tensor] = {}

    def capture(*args: Any, **kwargs: Any) -> None:
        captured.update(
            {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        )

    trainer.optimizer.step = capture
    trainer._step(0, batches(0, 1, 2))
    return captured


def _two_processes(model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> dict[str, torch.Tensor]:
    """Each process: the reference's loss on its micro-batch; then DDP's mean of the gradients."""
    micro = _micro_batches()
    counts = [model.count_masks(batch["label"]) for batch in micro]
    assert counts == [2, 4]
    mean = torch.tensor(sum(counts) / len(counts))
    monkeypatch.setattr(criterion_module, "average_across_processes", lambda value: mean.clone())
    total: dict[str, torch.Tensor] = {}
    for rank, batch in enumerate(micro):
        net = copy.deepcopy(model)
        torch.manual_seed(micro_batch_seed(SEED, 0, rank))  # what rank `rank` of 2 draws
        net.loss(batch["image"], batch["label"])["loss"].backward()
        for name, param in net.named_parameters():
            if param.grad is not None:
                total[name] = total.get(name, 0) + param.grad / len(micro)
    return total


def test_accumulation_equals_two_processes(
    model: torch.nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    accumulated = _trainer_gradients(model, tmp_path, step_normaliser=True)
    processes = _two_processes(model, monkeypatch)
    assert set(accumulated) == set(processes) and len(processes) > 100
    for name, grad in processes.items():
        torch.testing.assert_close(accumulated[name], grad, rtol=1e-5, atol=1e-9, msg=name)
    # per micro-batch counts (2 and 4 instead of their mean 3) give another gradient: the test has teeth
    monkeypatch.undo()  # one process, not distributed: each micro-batch's own count
    own = _trainer_gradients(model, tmp_path / "own", step_normaliser=False)
    difference = torch.cat([(own[n] - g).flatten() for n, g in processes.items()]).norm()
    assert difference > 1e-2 * torch.cat([g.flatten() for g in processes.values()]).norm()


def test_the_count_is_min_of_queries_and_classes(model: torch.nn.Module) -> None:
    labels = torch.cat(_labels())
    assert model.count_masks(labels) == 2 + 4
    assert model.count_masks(torch.full((1, 8, 8), 255)) == 0
