"""Loaders: deterministic and disjoint training streams, exact resume, exactly-once evaluation."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from data.eval_transforms import TestPipeline
from data.loaders import (
    EvalDataset,
    TrainStream,
    build_eval_loader,
    build_train_loader,
    stream_sample,
)
from data.readers import decode_image, find_samples, load_sample
from data.shards import PreparedDataset
from data.train_transforms import TrainPipeline

PIPELINE = TrainPipeline(scale=(128, 32), crop_size=(32, 32), to_mask=True)


def _stream(root: Path, **overrides: object) -> TrainStream:
    options = {"batch_size": 2, "seed": 5, "rank": 0, "world_size": 1}
    return TrainStream(PreparedDataset.open(root).split("train"), PIPELINE, **{**options, **overrides})


def _batches(loader: object, count: int) -> list[dict]:
    return list(islice(iter(loader), count))


def _assert_same_batches(first: list[dict], second: list[dict]) -> None:
    assert [b["keys"] for b in first] == [b["keys"] for b in second]
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def test_batch_format(prepared: dict) -> None:
    batch = next(iter(_stream(prepared["ade20k"].root)))
    assert batch["image"].shape == (2, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (2, 32, 32) and batch["label"].dtype == torch.int64
    assert len(batch["gt_labels"]) == len(batch["gt_masks"]) == 2
    for labels, masks, label in zip(batch["gt_labels"], batch["gt_masks"], batch["label"], strict=True):
        assert labels.dtype == torch.int64 and masks.dtype == torch.bool
        assert torch.equal(masks.sum(0) > 0, label != 255)


def test_same_seed_same_stream_other_seed_differs(prepared: dict) -> None:
    root = prepared["ade20k"].root
    first = _batches(_stream(root), 5)
    _assert_same_batches(first, _batches(_stream(root), 5))
    other = _batches(_stream(root, seed=6), 5)
    assert [b["keys"] for b in other] != [b["keys"] for b in first]


def test_every_pass_visits_each_sample_once(prepared: dict) -> None:
    keys = PreparedDataset.open(prepared["ade20k"].root).split("train").keys()
    batches = _batches(_stream(prepared["ade20k"].root, batch_size=3), 4)  # 12 positions = 2 passes over 6
    seen = [k for b in batches for k in b["keys"]]
    assert sorted(seen[:6]) == sorted(keys) and sorted(seen[6:]) == sorted(keys)
    assert seen[:6] != seen[6:]  # reshuffled per pass


def test_ranks_get_disjoint_samples_within_a_pass(prepared: dict) -> None:
    split = PreparedDataset.open(prepared["coco_stuff164k"].root).split("train")
    per_rank = []
    for rank in range(3):
        stream = TrainStream(split, PIPELINE, batch_size=2, seed=1, rank=rank, world_size=3)
        per_rank.append({stream_sample(1, t, len(split)) for t in stream.batch_positions(0)})
    assert [len(s) for s in per_rank] == [2, 2, 2]
    assert set.union(*per_rank) == set(range(6))  # 3 ranks x 2 samples cover the 6 samples once


def test_workers_share_the_rank_stream_and_resume_is_exact(prepared: dict) -> None:
    root = prepared["ade20k"].root
    stream = _stream(root, seed=9, rank=1, world_size=2)
    expected = [stream.batch(step) for step in range(6)]
    two_workers = build_train_loader(
        root, PIPELINE, batch_size=2, seed=9, rank=1, world_size=2, num_workers=2
    )
    batches = _batches(two_workers, 6)
    _assert_same_batches(batches, expected)  # workers split the steps; the order is the rank's stream
    assert len({tuple(b["keys"]) for b in batches[:2]}) == 2  # the two workers built different batches
    resumed = build_train_loader(
        root, PIPELINE, batch_size=2, seed=9, rank=1, world_size=2, num_workers=2, start_step=3
    )
    _assert_same_batches(_batches(resumed, 3), expected[3:])
    in_process = build_train_loader(root, PIPELINE, batch_size=2, seed=9, rank=1, world_size=2, num_workers=0)
    _assert_same_batches(_batches(in_process, 2), expected[:2])


def test_resume_in_process(prepared: dict) -> None:
    root = prepared["ade20k"].root
    full = _batches(_stream(root), 6)
    _assert_same_batches(full[4:], _batches(_stream(root, start_step=4), 2))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_evaluation_visits_every_sample_exactly_once(prepared: dict, twins: dict, world_size: int) -> None:
    root = prepared["pascal_context_59"].root
    seen = []
    for rank in range(world_size):
        for item in build_eval_loader(root, rank=rank, world_size=world_size):
            seen.append(item["key"])
    assert sorted(seen) == sorted(
        s.key for s in find_samples("pascal_context_59", twins["pascal_context_59"].root, "val")
    )
    assert len(seen) == len(set(seen)) == 5


def test_evaluation_items_keep_the_original_size(prepared: dict, twins: dict) -> None:
    raw = {s.key: s for s in find_samples("ade20k", twins["ade20k"].root, "val")}
    dataset = EvalDataset(
        PreparedDataset.open(prepared["ade20k"].root).split("val"), pipeline=TestPipeline(scale=(128, 32))
    )
    for index in range(len(dataset)):
        item = dataset[index]
        expected = load_sample(raw[item["key"]])
        np.testing.assert_array_equal(item["image"], decode_image(expected.image_bytes, source=""))
        np.testing.assert_array_equal(item["label"], expected.label)
        assert item["image"].dtype == np.uint8 and item["label"].shape == item["image"].shape[:2]
        assert (item["meta"]["height"], item["meta"]["width"]) == item["label"].shape
        (view,) = item["views"]
        assert min(view.img_shape) == 32 and view.image.shape[1] % 32 == 0


def test_accumulation_slots_read_what_ranks_would(prepared: dict) -> None:
    """One process with 2 micro-batches per step = 2 ranks: same samples, same grouping, same augmentation."""
    root = prepared["ade20k"].root
    accumulating = _stream(root, micro_batches=2)
    ranks = [_stream(root, rank=r, world_size=2) for r in range(2)]
    for step in range(3):
        bundle = accumulating.step_batches(step)
        _assert_same_batches(bundle, [ranks[r].batch(step) for r in range(2)])
    loader = build_train_loader(
        root, PIPELINE, batch_size=2, seed=5, num_workers=0, micro_batches=2, start_step=1
    )
    first = next(iter(loader))
    assert isinstance(first, list) and len(first) == 2
    _assert_same_batches(first, accumulating.step_batches(1))
    with pytest.raises(ValueError, match="micro_batches must be >= 1"):
        _stream(root, micro_batches=0)
