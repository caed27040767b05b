"""The one place where a zoo entry's data recipe becomes the data room's transform specs.

``models`` (the zoo) and ``data`` (the transforms) never import each other; this module maps
:class:`models.config.DataRecipe` onto :class:`data.train_transforms.TrainPipeline` and
:class:`data.eval_transforms.TestPipeline` (docs/reference.md §R3, each config's train/SS/MS pipelines).
"""

from __future__ import annotations

from typing import Literal

from data.eval_transforms import PadShortSide, TestPipeline
from data.train_transforms import TrainPipeline
from models.config import SegmentorConfig

EvalMode = Literal["ss", "ms"]


def train_pipeline(config: SegmentorConfig) -> TrainPipeline:
    """The training transform of ``config``."""
    recipe = config.data
    return TrainPipeline(
        scale=recipe.train.img_scale,
        crop_size=recipe.train.crop_size,
        ratio_range=recipe.train.ratio_range,
        cat_max_ratio=recipe.train.cat_max_ratio,
        flip_prob=recipe.train.flip_prob,
        mean=recipe.mean,
        std=recipe.std,
        to_rgb=recipe.to_rgb,
        # Mask2Former's criterion builds the reference's ToMask targets from the label map itself
        to_mask=False,
        ignore_index=config.ignore_index,
    )


def test_pipeline(config: SegmentorConfig, mode: EvalMode) -> TestPipeline:
    """The single-scale (``ss``) or multi-scale + flip (``ms``) test transform of ``config``.

    Raises:
        ValueError: ``ms`` for a config whose reference has no multi-scale pipeline.
    """
    recipe = config.data
    common = {
        "mean": recipe.mean,
        "std": recipe.std,
        "to_rgb": recipe.to_rgb,
        "crop_size": recipe.eval.crop_size[0],
    }
    if mode == "ss":
        return TestPipeline(
            scale=recipe.eval.img_scale,
            flip=recipe.eval.flip,
            size_divisor=recipe.eval.size_divisor,
            **common,
        )
    if mode != "ms":
        raise ValueError(f"evaluation mode must be 'ss' or 'ms', got {mode!r}")
    ms = recipe.eval.ms
    if ms is None:
        raise ValueError(f"{config.name}: the reference has no multi-scale test pipeline for this config")
    pad = None
    if ms.pad_short_side is not None:
        pad = PadShortSide(
            size=ms.pad_short_side, stage="before_normalize" if ms.pad_before_normalize else "after_normalize"
        )
    return TestPipeline(
        scale=recipe.eval.img_scale,
        ratios=ms.ratios,
        flip=ms.flip,
        resize_mode="setr" if ms.resize == "setr" else "mmseg",
        size_divisor=ms.size_divisor,
        pad_short_side=pad,
        **common,
    )
