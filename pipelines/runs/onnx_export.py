"""Export a segmentor's whole-image inference to ONNX (``vitadapter export onnx``).

The exported graph is ``model.predict``: a normalised (B, 3, H, W) image in, (B, K, H, W) class scores at
the input resolution out (UperNet: logits; Mask2Former: the semantic scores the reference softmaxes,
docs/reference.md §R2.5), before any softmax. It is traced with ``torch.export`` (the dynamo-based
``torch.onnx.export``) at one input size:

* the deformable attention runs the reference path (backend ``pytorch``: ``GridSample``, opset 16+), whatever
  backend the model was built with;
* every spatial shape (token grids, level shapes, reference points, offset normalisers, resize targets) is a
  constant of the graph: an export takes exactly ``H x W`` inputs. A BEiT trunk's relative position tables
  fix that size anyway (its ``img_size``, docs/reference.md §R2.1); a ViT trunk takes any multiple of 32, one
  export per size;
* the batch is 1, or any batch with ``dynamic_batch``.

Sliding windows and multi-scale + flip run around the ONNX session on the host
(:class:`pipelines.engine.onnx_session.OnnxSegmentor`, through the same window placement as the PyTorch
path). The zoo entry, its overrides and the input size are written into the file's metadata, so
``vitadapter predict --onnx`` needs nothing else.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import models.adapter.ms_deform_attn as ms_deform_attn_module
from data.atomic import atomic_write
from models.adapter.ms_deform_attn import MSDeformAttn
from models.builder import set_deform_attn_backend
from models.config import SegmentorConfig
from pipelines.engine.onnx_session import (
    META_CLASS_NAMES,
    META_DATASET,
    META_DEFORM_BACKEND,
    META_DYNAMIC_BATCH,
    META_ENTRY,
    META_NUM_CLASSES,
    META_OUTPUT,
    META_OVERRIDES,
    META_PALETTE,
    META_SIZE,
)

log = logging.getLogger(__name__)

# GridSample needs opset 16; 18 is what the dynamo exporter emits natively (no version conversion)
ONNX_OPSET = 18
INPUT_NAME = "image"
OUTPUT_NAME = "scores"
# protobuf caps one file at 2 GiB: larger models keep their weights in <file>.data beside it
_SINGLE_FILE_BYTES = 1_800_000_000
_EXPORTER_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx", "torch.export")


class WholeImage(nn.Module):
    """``model.predict`` as a module: (B, 3, H, W) normalised image -> (B, K, H, W) scores."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.predict(image)


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` wrote.

    Attributes:
        path: the ``.onnx`` file.
        size: (H, W) the graph takes.
        dynamic_batch: whether the batch dimension is free.
        opset: ONNX opset of the graph.
        metadata: the ``metadata_props`` written into the file.
    """

    path: Path
    size: tuple[int, int]
    dynamic_batch: bool
    opset: int
    metadata: dict[str, str]


def default_size(config: SegmentorConfig) -> tuple[int, int]:
    """The evaluation crop: the window size of the reference's sliding-window inference."""
    height, width = config.data.eval.crop_size
    return int(height), int(width)


def onnx_metadata(
    config: SegmentorConfig, overrides: dict[str, Any], size: tuple[int, int], *, dynamic_batch: bool
) -> dict[str, str]:
    """The ``metadata_props`` of an export: what rebuilds its config and test pipeline, and the dataset's class
    names, palette and record."""
    from data.catalog import get_dataset
    from pipelines.runs.inputs import class_names, palette

    return {
        META_ENTRY: config.name,
        META_OVERRIDES: json.dumps(
            {k: v for k, v in overrides.items() if k != "deform_attn_backend"}, sort_keys=True
        ),
        META_SIZE: f"{size[0]},{size[1]}",
        META_DYNAMIC_BATCH: "1" if dynamic_batch else "0",
        META_NUM_CLASSES: str(config.num_classes),
        META_OUTPUT: "logits" if config.head == "upernet" else "semantic_scores",
        META_DEFORM_BACKEND: "pytorch",
        # what a reader of the file needs to name and colour the classes (a user's card: its own)
        META_CLASS_NAMES: json.dumps(list(class_names(config))),
        META_PALETTE: json.dumps(palette(config).tolist()),
        META_DATASET: json.dumps(get_dataset(config.data.dataset).to_record(), sort_keys=True),
    }


@contextlib.contextmanager
def export_mode(model: nn.Module) -> Iterator[None]:
    """Make ``model`` traceable for the export, and restore it afterwards.

    The deformable attention runs the reference backend; timm attention modules use their explicit
    softmax path (``fused_attn`` off: the traced ``scaled_dot_product_attention`` with a bias mask gives
    strides torch.export's fake tensors cannot view; the arithmetic is the same); the deformable attention's
    per-shape cache is cleared around the trace (it would otherwise keep traced tensors).
    """
    backends = {m: m.backend for m in model.modules() if isinstance(m, MSDeformAttn)}
    fused = {m: m.fused_attn for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)}
    training = model.training
    set_deform_attn_backend(model, "pytorch")
    for module in fused:
        module.fused_attn = False
    model.eval()
    _clear_trace_caches()
    try:
        yield
    finally:
        _clear_trace_caches()
        for module, backend in backends.items():
            module.backend = backend
        for module, value in fused.items():
            module.fused_attn = value
        model.train(training)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter's graph passes log every rewrite at INFO: keep them to errors while it runs."""
    loggers = [logging.getLogger(name) for name in _EXPORTER_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _clear_trace_caches() -> None:
    """Empty the deformable attention module's caches of per-shape constants (filled by any forward)."""
    for value in vars(ms_deform_attn_module).values():
        if callable(getattr(value, "cache_clear", None)):
            value.cache_clear()


def check_export_size(model: nn.Module, size: tuple[int, int]) -> None:
    """Raise ValueError when ``size`` cannot go through ``model`` (multiple of 32; BEiT: its img_size)."""
    height, width = size
    if height <= 0 or width <= 0:
        raise ValueError(f"--size {height} {width}: height and width must be positive")
    check = getattr(model.backbone, "check_input_size", None)
    if check is not None:
        check(height, width)
    elif height % 32 or width % 32:
        raise ValueError(f"--size {height} {width}: height and width must be multiples of 32")


def export_onnx(
    model: nn.Module,
    config: SegmentorConfig,
    out: Path,
    *,
    overrides: dict[str, Any] | None = None,
    size: tuple[int, int] | None = None,
    dynamic_batch: bool = False,
    opset: int = ONNX_OPSET,
    optimize: bool = True,
) -> OnnxExport:
    """Export ``model.predict`` at one input size to ``out``.

    Args:
        model: the segmentor (left as it was: backend, mode and attention paths are restored).
        config: its zoo entry (with overrides).
        out: the ``.onnx`` file to write (its folder is created).
        overrides: the zoo overrides of ``config`` by full path, recorded in the metadata.
        size: (H, W) of the input; default the evaluation crop (the sliding window).
        dynamic_batch: a free batch dimension (else batch 1).
        opset: ONNX opset.
        optimize: run the exporter's graph optimisation (constant folding, dead-code removal; about half
            of the export time on a small model; onnxruntime optimises the graph again when loading it).

    Returns:
        What was written.

    Raises:
        ValueError: a size the model cannot take (not a multiple of 32; not a BEiT trunk's img_size).
    """
    import onnx

    size = tuple(int(v) for v in (size or default_size(config)))
    check_export_size(model, size)
    device = next(model.parameters()).device
    example = torch.randn(2 if dynamic_batch else 1, 3, *size, device=device)
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=1024)},) if dynamic_batch else None
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    external = sum(p.numel() * p.element_size() for p in model.parameters()) > _SINGLE_FILE_BYTES
    with export_mode(model), _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            WholeImage(model).eval(),
            (example,),
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=dynamic_shapes,
            optimize=optimize,
            verbose=False,
        )
    metadata = onnx_metadata(config, overrides or {}, size, dynamic_batch=dynamic_batch)
    proto = program.model_proto
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    if external:  # the weights go to <out>.data first, then the graph that refers to them
        staged = out.with_name(f".{out.name}.partial")
        onnx.save_model(proto, str(staged), save_as_external_data=True, location=f"{out.name}.data")
        staged.replace(out)
    else:
        atomic_write(out, lambda handle: handle.write(proto.SerializeToString()))
    log.info(
        "wrote %s (%s, %dx%d, %s batch, opset %d)",
        out,
        config.name,
        size[0],
        size[1],
        "dynamic" if dynamic_batch else "1-image",
        opset,
    )
    return OnnxExport(path=out, size=size, dynamic_batch=dynamic_batch, opset=opset, metadata=metadata)


def export_checkpoint(
    name: str | None,
    checkpoint: Path,
    out: Path,
    *,
    overrides: dict[str, Any] | None = None,
    size: tuple[int, int] | None = None,
    dynamic_batch: bool = False,
    opset: int = ONNX_OPSET,
) -> OnnxExport:
    """Load a checkpoint (zoo entry ``name``, or the one it records) and export it with :func:`export_onnx`.

    Args:
        name: zoo entry, or None for the entry the checkpoint records.
        checkpoint: official, imported or training checkpoint.
        out: the ``.onnx`` file.
        overrides: zoo overrides by full path; None: those the checkpoint records.
        size, dynamic_batch, opset: as :func:`export_onnx`.

    Raises:
        ValueError: no entry given or recorded, a checkpoint of another entry, or a size the model cannot take.
        FileNotFoundError: the checkpoint does not exist.
    """
    from models.checkpoint import load_checkpoint_file
    from pipelines.runs.inputs import model_from_checkpoint, recorded_entry

    state = load_checkpoint_file(checkpoint)
    name = name or recorded_entry(state, checkpoint)
    if overrides is None:
        overrides = dict(state.get("overrides") or {})
    model, config, _ = model_from_checkpoint(
        name, checkpoint, overrides, backend="pytorch", state=state, device=torch.device("cpu")
    )
    return export_onnx(
        model, config, out, overrides=overrides, size=size, dynamic_batch=dynamic_batch, opset=opset
    )
