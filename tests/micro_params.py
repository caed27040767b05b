"""A micro params.yaml for pipeline tests: a synthetic ADE20K twin and a tiny UperNet, seconds per stage."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

# a tiny ViT-Adapter + UperNet (any UperNet zoo entry shrinks to it)
TINY_MODEL = {
    "embed_dim": 64,
    "depth": 4,
    "num_heads": 2,
    "deform_num_heads": 2,
    "conv_inplane": 16,
    "channels": 32,
}
# ... trained and evaluated on 64-pixel crops
TINY_DATA = {"crop_size": [64, 64], "img_scale": [128, 64], "stride": [48, 48]}
TINY_UPERNET = {**TINY_MODEL, **TINY_DATA, "lr": 0.001, "warmup_iters": 5}

MICRO: dict[str, Any] = {
    "paths": {
        "data": "artifacts/data",
        "runs": "artifacts/runs",
        "weights": "artifacts/pretrained",
        "metrics": "metrics",
        "reports": "artifacts/reports",
    },
    "tracking": {
        "uri": "sqlite:///mlflow.db",
        "experiment": "micro",
        "reference_experiment": "micro-reference",
    },
    "datasets": {
        "ade20k": {
            "source": "synthetic",
            "num_train": 8,
            "num_val": 3,
            "seed": 0,
            "min_size": 64,
            "max_size": 96,
            "num_classes_used": 4,
        }
    },
    "runs": {
        "tiny": {
            "config": "upernet_deit_adapter_tiny_512_160k_ade20k",
            "overrides": TINY_UPERNET,
            "init_from": "none",
            "train": {
                "max_iters": 4,
                "batch_size": 2,
                "global_batch": 2,
                "log_interval": 2,
                "eval_interval": 4,
                "checkpoint_interval": 4,
                "num_workers": 0,
                "pretrained": "none",
            },
            "eval": {"modes": ["ss"], "limit": 2},
        }
    },
}


def micro_params(**changes: Any) -> dict[str, Any]:
    """A deep copy of MICRO with top-level sections replaced."""
    params = copy.deepcopy(MICRO)
    params.update(changes)
    return params


def write_params(path: Path, params: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


# a tiny BEiT-Adapter + Mask2Former (any Mask2Former zoo entry shrinks to it), on 64-pixel crops
TINY_M2F = {
    "embed_dim": 64,
    "depth": 4,
    "num_heads": 2,
    "deform_num_heads": 2,
    "conv_inplane": 16,
    "img_size": 64,
    "feat_channels": 32,
    "out_channels": 32,
    "num_queries": 16,
    "encoder_num_heads": 2,
    "decoder_num_heads": 2,
    "encoder_ffn_channels": 64,
    "decoder_ffn_channels": 64,
    "train_num_points": 256,
    "with_cp": False,
    "pad_short_side": 64,
    **TINY_DATA,
}
