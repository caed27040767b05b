"""A micro params.yaml for pipeline tests: a synthetic ADE20K twin and a tiny UperNet, seconds per stage."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml

import models

# the tiny models (any UperNet or Mask2Former zoo entry shrinks to one, on 64-pixel crops) are the library's
# "tiny" preset (models/presets.py): the demo and the tests share that one definition
TINY_MODEL: dict[str, Any] = {"preset": "tiny"}
TINY_UPERNET_OVERRIDES = {"optimizer.lr": 0.001, "schedule.warmup_iters": 5}


def tiny_config(name: str, overrides: dict[str, Any] | None = None, **fields: Any) -> Any:
    """The tiny preset of ``name`` with ``overrides``; ``fields`` replace top-level fields unchecked (e.g. a
    small ``num_classes`` for a model test: a config the zoo's validation would refuse for its dataset)."""
    config = models.get_config(name, overrides, preset="tiny")
    return dataclasses.replace(config, **fields) if fields else config


def tiny_model(name: str, overrides: dict[str, Any] | None = None, **fields: Any) -> Any:
    """The segmentor of :func:`tiny_config`."""
    return models.build_segmentor(tiny_config(name, overrides, **fields))


def cli_model_args(overrides: dict[str, Any] | None = None, *, preset: str | None = "tiny") -> list[str]:
    """``--preset`` and ``--set PATH=VALUE`` arguments of the command line."""
    args = ["--preset", preset] if preset else []
    for key, value in (overrides or {}).items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    return args


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
            "preset": "tiny",
            "overrides": TINY_UPERNET_OVERRIDES,
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


def ade_twin_shards(root: Path, **synthesize_args: Any) -> Path:
    """A synthetic ADE20K twin written under ``root/raw`` and prepared into ``root/prepared`` (returned);
    ``synthesize_args``: :func:`data.synthetic.synthesize`'s sizes and seed."""
    from data.prepare import prepare_dataset
    from data.synthetic import synthesize

    report = synthesize("ade20k", root / "raw", **synthesize_args)
    prepare_dataset("ade20k", report.root, root / "prepared")
    return root / "prepared"
