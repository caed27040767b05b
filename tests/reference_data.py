"""Reference fixtures for the tests: manifests, parameter counts, goldens and the fill rule.

The data live in ``tests/fixtures/reference`` (copied from the reference notes' data, see
``docs/reference.md`` §G1-§G3, by ``tools/make_reference_fixtures.py``). The fill rule is the one of ``docs/reference.md`` §G1.1: every
state-dict entry keyed ``k`` with shape ``s`` is filled from a generator seeded with the first 8
bytes of sha256(k).
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "reference"
FILL_STD = 0.02
_DTYPES = {"float32": torch.float32, "int64": torch.int64}


@dataclass(frozen=True)
class Manifest:
    """Official state-dict layout of one reference model."""

    config: str
    keys: list[tuple[str, tuple[int, ...], str]]
    norm_weight_keys: frozenset[str]
    non_parameter_keys: frozenset[str]

    @property
    def shapes(self) -> OrderedDict[str, tuple[int, ...]]:
        return OrderedDict((k, s) for k, s, _ in self.keys)


def manifest_names() -> list[str]:
    return sorted(p.name.removesuffix(".json.gz") for p in (FIXTURES / "manifests").glob("*.json.gz"))


@cache
def load_manifest(name: str) -> Manifest:
    with gzip.open(FIXTURES / "manifests" / f"{name}.json.gz", "rt") as handle:
        raw = json.load(handle)
    return Manifest(
        config=raw["config"],
        keys=[(k, tuple(s), d) for k, s, d in raw["keys"]],
        norm_weight_keys=frozenset(raw["norm_weight_keys"]),
        non_parameter_keys=frozenset(raw["non_parameter_keys"]),
    )


@cache
def reference_param_counts() -> dict[str, int]:
    return json.loads((FIXTURES / "param_counts.json").read_text())["total_params"]


def fill_seed(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") % 2**63


def fill_value(key: str, shape: tuple[int, ...], norm_weight_keys: frozenset[str]) -> torch.Tensor:
    """The deterministic value of one floating-point entry under the fill rule."""
    generator = torch.Generator().manual_seed(fill_seed(key))
    values = torch.randn(shape, generator=generator, dtype=torch.float64).float() * FILL_STD
    if key.endswith("running_var"):
        return values.abs() + 1.0
    if key in norm_weight_keys:
        return 1.0 + values
    return values


def fill_state_dict(
    manifest: Manifest, constructed: dict[str, torch.Tensor], *, rename: dict[str, str] | None = None
) -> OrderedDict[str, torch.Tensor]:
    """An official-layout state dict filled by the rule of docs/reference.md §G1.1.

    Args:
        manifest: the layout (key, shape, dtype).
        constructed: the model's own state dict, for the non-floating entries that keep their
            constructed values (``num_batches_tracked``, BEiT's ``relative_position_index``).
        rename: optional manifest-key -> shape overrides are not needed; keys are used as is.
    """
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, shape, dtype in manifest.keys:
        if _DTYPES[dtype].is_floating_point:
            out[key] = fill_value(key, shape, manifest.norm_weight_keys)
        else:
            out[key] = constructed[key].clone()
    return out


@dataclass(frozen=True)
class Golden:
    """Subsampled reference outputs and how they were subsampled."""

    config: str
    arrays: dict[str, np.ndarray]
    stored: dict[str, dict]
    input_shape: tuple[int, ...]
    input_sum: float
    input_first4: list[float]
    fill_checks: dict[str, dict]
    backbone_overrides: dict | None

    def subsample(self, key: str, tensor: torch.Tensor) -> np.ndarray:
        """Apply the stored subsampling of ``key`` to our full-size output."""
        spec = self.stored[key]
        array = tensor.detach().cpu().numpy()
        if tuple(array.shape) != tuple(spec["full_shape"]):
            raise AssertionError(f"{key}: our shape {array.shape} vs reference {spec['full_shape']}")
        if array.ndim == 4:
            return array[:, :: spec["channel_stride"], :: spec["stride"], :: spec["stride"]]
        return array


def load_golden(name: str) -> Golden:
    info = json.loads((FIXTURES / f"golden_{name}.json").read_text())
    with np.load(FIXTURES / f"golden_{name}.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    return Golden(
        config=info["config"],
        arrays=arrays,
        stored=info["stored"],
        input_shape=tuple(info["input_shape"]),
        input_sum=info["input_sum"],
        input_first4=info["input_first4"],
        fill_checks=info["fill_checks"],
        backbone_overrides=info["backbone_overrides"],
    )


def golden_input(golden: Golden) -> torch.Tensor:
    """The parity input: float64 randn with seed 0, cast to float32 (checked against the stored sum)."""
    x = torch.randn(
        golden.input_shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    ).float()
    if abs(x.double().sum().item() - golden.input_sum) > 1e-6 * max(1.0, abs(golden.input_sum)):
        raise AssertionError("the regenerated parity input differs from the reference's")
    return x


def load_golden_info(name: str) -> dict:
    """The whole json of a golden (e.g. per-key ``tolerances`` and Mask2Former's attention-mask stats)."""
    return json.loads((FIXTURES / f"golden_{name}.json").read_text())


@dataclass(frozen=True)
class TrainStepGolden:
    """The recorded training step (docs/reference.md §T): the json's facts and the npz arrays.

    Attributes:
        info: settings, ``log_vars`` (float32 losses), ``float64_losses``, ``groups`` (every parameter's
            group, lr and weight decay), ``lr_at_iter``, ``step_iter1500_group_lr``, ``chosen`` (per tensor:
            shape, ``stride`` of the stored flat subsample, full-gradient norm, pre-step weight sum), ``bn``.
        arrays: ``grad/<name>`` and ``delta1500/<name>`` (flat subsamples), ``bn/<module>.<stat>.<when>``.
    """

    info: dict
    arrays: dict[str, np.ndarray]

    def subsample(self, name: str, tensor: torch.Tensor) -> np.ndarray:
        """``tensor`` flattened and subsampled like the stored arrays of ``name``, as float64."""
        spec = self.info["chosen"][name]
        if list(tensor.shape) != spec["shape"]:
            raise AssertionError(f"{name}: our shape {tuple(tensor.shape)} vs reference {spec['shape']}")
        return tensor.detach().reshape(-1)[:: spec["stride"]].double().numpy()


def load_train_step(name: str) -> TrainStepGolden:
    with gzip.open(FIXTURES / f"train_step_{name}.json.gz", "rt") as handle:
        info = json.load(handle)
    with np.load(FIXTURES / f"train_step_{name}.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    return TrainStepGolden(info=info, arrays=arrays)
