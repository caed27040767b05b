"""Parameters, FLOPs and latency of zoo entries (``vitadapter analyze``).

* **Parameters** per component, counted on the meta device: the *trunk* (the ViT/BEiT blocks, patch
  embedding, position embedding, cls/register tokens), the *adapter* (spatial prior module, interactions,
  level embedding, the 1/4 up-sampling and the four output norms) and the *head* (decode head and, for
  UperNet, the auxiliary FCN head, which inference does not run). They add up to ``num_params`` of
  ``vitadapter configs list``.
* **FLOPs** of one forward (``model(image)``: backbone and decode head, batch 1) at the evaluation crop (the
  sliding window) or a given size, traced on the meta device in well under a second per entry. The dense
  operators (linear layers, convolutions, matrix products, attention) are counted by
  ``torch.utils.flop_counter.FlopCounterMode``: 2 FLOPs per multiply-add; element-wise operations,
  normalisation, softmax and resizes are not counted, the usual convention. The deformable attention's
  sampling (``grid_sample`` and the weighted sum, which FlopCounterMode does not count) is counted by its
  formula and shown separately: per query, head, level, point and value channel, 4 bilinear taps and one
  attention weight, 5 multiply-adds = 10 FLOPs.
* **Latency** (only with ``latency=True``): the median wall time of ``model(image)`` with random weights on
  the given device after warm-up, images/s = batch / latency, and the deformable-attention backend that ran.
"""

from __future__ import annotations

import re
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import cuda_ops
import models
from models.config import SegmentorConfig

COMPONENTS = ("trunk", "adapter", "head")
# backbone parameters and modules that belong to the adapter; every other backbone part is the trunk
ADAPTER_PARTS = ("spm", "interactions", "level_embed", "up", "norm1", "norm2", "norm3", "norm4")
_TRUNK_MODULE = re.compile(r"backbone\.(blocks\.\d+|patch_embed)")
SAMPLING_FLOPS_PER_CHANNEL = 10  # 5 multiply-adds: 4 bilinear taps + the attention weight


def component_of(parameter: str) -> str:
    """``trunk``, ``adapter`` or ``head`` for a parameter name of a segmentor."""
    parts = parameter.split(".")
    if parts[0] in ("decode_head", "auxiliary_head"):
        return "head"
    if parts[0] != "backbone":
        raise ValueError(f"parameter {parameter!r} is outside the backbone and heads")
    return "adapter" if parts[1] in ADAPTER_PARTS else "trunk"


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameters per component and ``total``."""
    counts = dict.fromkeys(COMPONENTS, 0)
    for name, parameter in model.named_parameters():
        counts[component_of(name)] += parameter.numel()
    return {**counts, "total": sum(counts.values())}


@dataclass
class _SamplingCounter:
    """Forward pre-hook of every deformable attention: adds the sampling FLOPs of the call."""

    flops: int = 0

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        query, _, _, spatial_shapes = args[:4]
        batch, queries = int(query.shape[0]), int(query.shape[1])
        self.flops += (
            SAMPLING_FLOPS_PER_CHANNEL
            * batch
            * queries
            * len(spatial_shapes)
            * module.n_points
            * module.value_dim  # heads x channels per head
        )


def count_flops(
    model: nn.Module, size: tuple[int, int], *, device: str | torch.device = "meta"
) -> dict[str, int]:
    """FLOPs of ``model(image)`` for one (1, 3, H, W) image.

    Args:
        model: a segmentor whose parameters are on ``device`` (the meta device: no memory, no arithmetic).
        size: (H, W).
        device: where the input is made.

    Returns:
        ``dense`` (FlopCounterMode's count) split into ``trunk``, ``adapter`` and ``head``,
        ``deform_sampling`` (by formula) and ``total`` (dense + sampling).
    """
    from torch.utils.flop_counter import FlopCounterMode

    from models.adapter.ms_deform_attn import MSDeformAttn

    counter = _SamplingCounter()
    hooks = [m.register_forward_pre_hook(counter) for m in model.modules() if isinstance(m, MSDeformAttn)]
    grads = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)  # FlopCounterMode's module tracking needs outputs without a pending graph
    try:
        with FlopCounterMode(display=False) as flop_counter:
            model(torch.empty(1, 3, *size, device=device))
    finally:
        for hook in hooks:
            hook.remove()
        for parameter, flag in grads.items():
            parameter.requires_grad_(flag)
    per_module = {
        name.split(".", 1)[1] if "." in name else name: sum(counts.values())
        for name, counts in flop_counter.get_flop_counts().items()
    }
    dense = int(flop_counter.get_total_flops())
    backbone = per_module.get("backbone", 0)
    # the trunk's modules at their own level (their children are counted inside them)
    trunk = sum(flops for name, flops in per_module.items() if _TRUNK_MODULE.fullmatch(name))
    return {
        "dense": dense,
        "trunk": int(trunk),
        "adapter": int(backbone - trunk),
        "head": int(dense - backbone),
        "deform_sampling": counter.flops,
        "total": dense + counter.flops,
    }


def measure_latency(
    model: nn.Module,
    size: tuple[int, int],
    *,
    device: torch.device,
    batch: int = 1,
    warmup: int = 2,
    runs: int = 5,
) -> dict[str, Any]:
    """Median wall time of ``model(images)`` for a (batch, 3, H, W) input on ``device``.

    Returns:
        ``device``, ``backend`` (the deformable attention that ran), ``batch``, ``latency_ms`` and
        ``images_per_s``.
    """
    model.eval()
    images = torch.randn(batch, 3, *size, device=device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    before = cuda_ops.backend_usage()
    times = []
    with torch.no_grad():
        for step in range(warmup + runs):
            sync()
            start = time.perf_counter()
            model(images)
            sync()
            if step >= warmup:
                times.append(time.perf_counter() - start)
    latency = statistics.median(times)
    used = cuda_ops.usage_since(before)
    return {
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "backend": "+".join(sorted(used)) or "none",
        "batch": batch,
        "latency_ms": 1000.0 * latency,
        "images_per_s": batch / latency,
    }


def analysis_size(config: SegmentorConfig) -> tuple[int, int]:
    """The evaluation crop (the sliding window: the input of every forward of the reference inference)."""
    height, width = config.data.eval.crop_size
    return int(height), int(width)


def analyze_entry(
    name: str,
    overrides: dict[str, Any] | None = None,
    *,
    size: tuple[int, int] | None = None,
    latency: bool = False,
    device: torch.device | None = None,
    batch: int = 1,
    runs: int = 5,
) -> dict[str, Any]:
    """Parameters and FLOPs of zoo entry ``name`` (counted on the meta device), and its latency if asked.

    Args:
        name: zoo entry.
        overrides: zoo overrides (``--preset``/``--set``).
        size: (H, W) input; default the evaluation crop. Given, it also becomes the crop (``crop_size``), so a
            BEiT trunk is built for it (its relative position tables, hence its parameters, follow the size).
        latency: also measure the latency on ``device`` (random weights).
        device: where to measure (default CUDA when present, else the CPU).
        batch: images per timed forward.
        runs: timed forwards (after 2 warm-up ones).

    Raises:
        ValueError: an unknown entry, a bad override or a size the model cannot take.
    """
    overrides = dict(overrides or {})
    if (
        size is not None
    ):  # the crop follows (a BEiT trunk's img_size with it); the window step stays inside it
        stride = models.get_config(name, overrides).data.eval.stride
        overrides.setdefault("data.train.crop_size", [int(size[0]), int(size[1])])
        overrides.setdefault("data.eval.stride", [min(stride[0], int(size[0])), min(stride[1], int(size[1]))])
    config = models.get_config(name, overrides)
    size = tuple(size) if size is not None else analysis_size(config)
    with torch.device("meta"):
        model = models.build_segmentor(config).eval()
    check = getattr(model.backbone, "check_input_size", None)
    if check is not None:
        check(*size)
    row: dict[str, Any] = {
        "name": name,
        "head": config.head,
        "input_size": list(size),
        "params": parameter_counts(model),
        "flops": count_flops(model, size),
    }
    if latency:
        device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        torch.manual_seed(0)
        real = models.build_segmentor(config).to(device)
        row["latency"] = measure_latency(real, size, device=device, batch=batch, runs=runs)
    return row
