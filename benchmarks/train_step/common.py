"""Shared pieces of the model-level benchmarks (training step, evaluation): the benchmarked zoo entries
and their tiny CPU-smoke overrides, model construction, synthetic labels, the record of which
deformable-attention backend the model really ran, peak memory and the run's metadata.

Imported by ``bench_train_step.py`` beside it and by ``benchmarks/eval/bench_eval.py``
(as ``benchmarks.train_step.common``, with the repository root on ``sys.path``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import importlib
import logging
import os
import platform
import resource
import shlex
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

import models
from models.config import SegmentorConfig

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
SMOKE_LABEL = (
    "cpu-smoke: tiny overrides of the models on the CPU, run only to exercise the script; "
    "NOT a benchmark, its times and memory say nothing about the models' performance"
)
GB = 1e9  # "80 GB" of the issue: decimal gigabytes

# Tiny architecture shared by both smoke models (tests/models/test_segmentor.py and test_mask2former.py).
SMOKE_CROP = 64
# Smoke evaluation: 64-short-side images (the 512-short-side images scaled by 1/8), 64 windows.
SMOKE_EVAL_IMAGE = (64, 85)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One benchmarked model.

    Attributes:
        key: the name on the command line.
        zoo: the zoo entry (``models.list_configs()``).
        tiny: overrides of the CPU smoke run, on top of the ``tiny`` preset (models/presets.py).
        tiny_eval: extra overrides of the smoke evaluation (test scale, stride).
    """

    key: str
    zoo: str
    tiny: dict[str, Any]
    tiny_eval: dict[str, Any]


MODELS: dict[str, ModelSpec] = {
    spec.key: spec
    for spec in (
        ModelSpec(
            "upernet-deit-b",
            "upernet_deit_adapter_base_512_160k_ade20k",
            {},
            {"data.eval.img_scale": (256, 64), "data.eval.stride": (43, 43)},
        ),
        ModelSpec(
            "upernet-augreg-b",
            "upernet_augreg_adapter_base_512_160k_ade20k",
            {},
            {"data.eval.img_scale": (256, 64), "data.eval.stride": (43, 43)},
        ),
        ModelSpec(
            "m2f-beit-l",
            "mask2former_beit_adapter_large_896_80k_ade20k",
            {
                "decode_head.num_queries": 8,
                "decode_head.num_encoder_layers": 2,
                "decode_head.num_decoder_layers": 3,
            },
            {"data.eval.img_scale": (256, 64), "data.eval.stride": (32, 32)},
        ),
    )
}


def model_config(
    spec: ModelSpec, *, smoke: bool, with_cp: bool | None, for_eval: bool = False
) -> SegmentorConfig:
    """The zoo entry of ``spec``: tiny when ``smoke``; ``with_cp`` overrides gradient checkpointing
    (backbone and, for Mask2Former, the head's FFNs) unless None (the recipe's setting)."""
    overrides: dict[str, Any] = {}
    if smoke:
        overrides.update(spec.tiny)
        if for_eval:
            overrides.update(spec.tiny_eval)
    if with_cp is not None:
        overrides["backbone.with_cp"] = with_cp
        if models.get_config(spec.zoo).head == "mask2former":
            overrides["decode_head.with_cp"] = with_cp
    return models.get_config(spec.zoo, overrides, preset="tiny" if smoke else None)


def recipe_with_cp(spec: ModelSpec) -> bool:
    """Whether the recipe trains ``spec`` with gradient checkpointing (backbone setting)."""
    return models.get_config(spec.zoo).backbone.with_cp


def build_model(config: SegmentorConfig, device: torch.device, deform_backend: str) -> nn.Module:
    """Build the segmentor with random initialisation (no pretrained weights) on ``device``.

    Built directly on the device where possible (the 570 M parameters of BEiT-Adapter-L initialise in
    seconds on a GPU, minutes on two CPU cores); any failure there falls back to a CPU build moved over.
    Every deformable-attention module gets ``backend=deform_backend``.
    """
    torch.manual_seed(0)
    model: nn.Module
    if device.type == "cuda":
        try:
            with torch.device(device):
                model = models.build_segmentor(config)
            model = model.to(device)  # anything created with an explicit CPU device
        except Exception as exc:  # any failure of the on-device build: fall back to the CPU
            log.warning("building on %s failed (%r); building on the CPU", device, exc)
            model = models.build_segmentor(config).to(device)
    else:
        model = models.build_segmentor(config)
    set_deform_backend(model, deform_backend)
    return model


def set_deform_backend(model: nn.Module, backend: str) -> None:
    """Set the ``cuda_ops.ms_deform_attn`` backend of every deformable-attention module of ``model``."""
    from models.adapter import MSDeformAttn

    for module in model.modules():
        if isinstance(module, MSDeformAttn):
            module.backend = backend


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def synthetic_labels(
    batch: int, size: tuple[int, int], num_classes: int, generator: torch.Generator, blocks: int = 4
) -> torch.Tensor:
    """Label maps of ``blocks x blocks`` constant rectangles (at most ``blocks**2`` classes an image, about
    what an ADE20K crop holds: Mask2Former's matching and mask losses scale with the classes present), the
    top 8 rows ignored (255)."""
    coarse = torch.randint(0, num_classes, (batch, blocks, blocks), generator=generator)
    height, width = size
    rows = torch.arange(height) * blocks // height
    cols = torch.arange(width) * blocks // width
    labels = coarse[:, rows][:, :, cols].clone()
    labels[:, :8] = 255
    return labels


def resolve_backend(value: torch.Tensor, requested: str) -> str:
    """The backend ``cuda_ops.ms_deform_attn(value, ..., backend=requested)`` runs (the dispatcher's own rule)."""
    import cuda_ops

    return cuda_ops.resolve_backend(value, requested)


class BackendRecorder:
    """Counts the model's deformable-attention calls by (backend actually run, value dtype, device).

    Wraps the ``ms_deform_attn`` name that :mod:`models.adapter.ms_deform_attn` calls (the adapter's
    injectors and extractors and the Mask2Former pixel decoder all go through it) while active.
    """

    def __init__(self) -> None:
        self.calls: Counter[tuple[str, str, str]] = Counter()
        self._module: Any = None
        self._original: Any = None

    def __enter__(self) -> BackendRecorder:
        self._module = importlib.import_module("models.adapter.ms_deform_attn")
        self._original = original = self._module.ms_deform_attn

        def recording(
            value: torch.Tensor,
            spatial_shapes: Any,
            sampling_locations: torch.Tensor,
            attention_weights: torch.Tensor,
            *,
            backend: str = "auto",
        ) -> torch.Tensor:
            out = original(value, spatial_shapes, sampling_locations, attention_weights, backend=backend)
            used = resolve_backend(value, backend)
            self.calls[(used, str(value.dtype).removeprefix("torch."), value.device.type)] += 1
            return out

        self._module.ms_deform_attn = recording
        return self

    def __exit__(self, *exc: object) -> None:
        self._module.ms_deform_attn = self._original

    def summary(self) -> list[dict[str, Any]]:
        """One entry per (backend, value dtype, device) with its number of calls."""
        return [
            {"backend": backend, "value_dtype": dtype, "device": device, "calls": count}
            for (backend, dtype, device), count in sorted(self.calls.items())
        ]


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, float | None]:
    """Peak bytes since the last reset: ``torch.cuda.max_memory_allocated`` (tensors) and
    ``max_memory_reserved`` (what the caching allocator held). On the CPU: None (no per-run figure; the
    process's max RSS is recorded in the metadata)."""
    if device.type != "cuda":
        return {"peak_allocated_GB": None, "peak_reserved_GB": None}
    return {
        "peak_allocated_GB": torch.cuda.max_memory_allocated(device) / GB,
        "peak_reserved_GB": torch.cuda.max_memory_reserved(device) / GB,
    }


def release(device: torch.device) -> None:
    """Return cached blocks, so the next configuration's peak starts from what is really held."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


@contextlib.contextmanager
def oom_guard(device: torch.device, row: dict[str, Any]) -> Iterator[None]:
    """Record ``row["status"] = "out of memory"`` instead of raising on a CUDA out-of-memory error."""
    out_of_memory = False
    try:
        yield
    except torch.cuda.OutOfMemoryError as exc:
        row["status"] = "out of memory"
        row["error"] = str(exc).splitlines()[0]
        out_of_memory = True
    if out_of_memory:  # outside the except block: the traceback's frames, and their tensors, are gone
        gc.collect()
        release(device)


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    except OSError:  # no git on this machine
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _driver_version() -> str | None:
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=False,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def metadata(device: torch.device, mode: str) -> dict[str, Any]:
    """Device, versions, date, git commit and the exact command of this run."""
    try:
        import triton

        triton_version: str | None = triton.__version__
    except ImportError:
        triton_version = None
    cuda = device.type == "cuda"
    properties = torch.cuda.get_device_properties(device) if cuda else None
    status = _git("status", "--porcelain")
    return {
        "mode": mode,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", *sys.argv]),
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "device_memory_GB": properties.total_memory / GB if properties else None,
        "compute_capability": f"{properties.major}.{properties.minor}" if properties else None,
        "driver": _driver_version() if cuda else None,
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "allow_tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "allow_tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
    }


def process_max_rss_mib() -> float:
    """The process's peak resident memory so far (MiB; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def backends_used(rows: list[dict[str, Any]]) -> list[str]:
    """The distinct deformable-attention backends the rows ran."""
    return sorted({entry["backend"] for row in rows for entry in row.get("ms_deform_attn", [])})


def default_out(here: Path, device: torch.device, smoke: bool) -> Path:
    """``results_cpu_smoke.json`` or ``results_<gpu name>.json`` beside the script."""
    if smoke:
        return here / "results_cpu_smoke.json"
    name = torch.cuda.get_device_name(device).replace(" ", "_").lower()
    return here / f"results_{name}.json"
