"""Official ViT-Adapter checkpoints: strict loading, exact export, safe file reading.

The project's modules carry the official parameter names (docs/reference.md §P6;
``docs/reference.md`` §G2), so an official mmseg ``state_dict`` (keys ``backbone.*``,
``decode_head.*``, ``auxiliary_head.*``) maps one to one onto ``model.state_dict()``, and the
export gives back exactly that layout. Loading is strict by default: every key must be used and
every missing, unexpected or mis-shaped key is reported by name.

Files are read with ``torch.load(weights_only=True)``; the numpy scalar types mmcv writes into a
checkpoint's ``meta`` (e.g. the best mIoU) are allow-listed. The released Mask2Former checkpoints
are ``.zip`` archives around a ``.pth``/``.pth.tar``; those are read without unpacking to disk.
"""

from __future__ import annotations

import io
import logging
import os
import re
import zipfile
from collections import Counter, OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".pth", ".pth.tar", ".pt", ".bin", ".ckpt")
_WRAPPER_KEYS = ("state_dict", "model", "module")
_STRIP_PREFIXES = ("module.",)


class CheckpointError(ValueError):
    """A checkpoint file or state dict that cannot be used; the message names the file or keys."""


# keys named per problem kind in a summary; the key report file has them all
SUMMARY_KEYS = 8
# what torch's weights-only unpickler names when it refuses an object
_UNSAFE_GLOBAL = re.compile(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)")


@dataclass
class LoadReport:
    """What a load did.

    Attributes:
        loaded: keys copied into the model.
        missing: model keys absent from the state dict.
        unexpected: state-dict keys the model does not have.
        mismatched: (key, model shape, state-dict shape) for keys of a different shape.
        source: where the state dict came from, if known.
    """

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    source: str | None = None

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self, *, shown: int = SUMMARY_KEYS) -> str:
        """A readable report: per problem kind, the count per key prefix and the first ``shown`` keys
        (the full lists are in :meth:`to_dict`, which the runs write to their key report)."""
        where = f" from {self.source}" if self.source else ""
        lines = [f"loaded {len(self.loaded)} tensors{where}"]
        mismatched = [f"{k} model {list(a)} vs checkpoint {list(b)}" for k, a, b in self.mismatched]
        for kind, keys, names in (
            ("missing", self.missing, self.missing),
            ("unexpected", self.unexpected, self.unexpected),
            ("shape mismatch", mismatched, [k for k, _, _ in self.mismatched]),
        ):
            if not keys:
                continue
            prefixes = Counter(".".join(name.split(".")[:2]) for name in names)
            by_prefix = ", ".join(f"{prefix} ({count})" for prefix, count in prefixes.most_common())
            first = ", ".join(keys[:shown]) + (
                f", ... ({len(keys) - shown} more)" if len(keys) > shown else ""
            )
            lines.append(f"{kind} ({len(keys)}) by prefix: {by_prefix}; {first}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "loaded": self.loaded,
            "missing": self.missing,
            "unexpected": self.unexpected,
            "mismatched": [
                {"key": k, "model": list(a), "checkpoint": list(b)} for k, a, b in self.mismatched
            ],
        }


def unwrap_state_dict(obj: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint: ``state_dict``/``model``/``module`` unwrapped, ``module.`` stripped.

    Raises:
        CheckpointError: if no tensor dict can be found or a value is not a tensor.
    """
    current: Any = obj
    for _ in range(len(_WRAPPER_KEYS)):
        if not isinstance(current, Mapping):
            break
        inner = next(
            (current[k] for k in _WRAPPER_KEYS if k in current and isinstance(current[k], Mapping)), None
        )
        if inner is None:
            break
        current = inner
    if not isinstance(current, Mapping) or not current:
        raise CheckpointError(
            "no state dict found (expected a mapping of tensors, or under 'state_dict'/'model')"
        )
    out: dict[str, torch.Tensor] = {}
    for key, value in current.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"state dict entry {key!r} is a {type(value).__name__}, not a tensor")
        for prefix in _STRIP_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def compare_state_dict(
    expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], *, source: str | None = None
) -> LoadReport:
    """Key and shape comparison of a state dict against a model's (or a manifest's) layout."""
    report = LoadReport(source=source)
    for key, ref in expected.items():
        if key not in given:
            report.missing.append(key)
        elif tuple(given[key].shape) != tuple(ref.shape):
            report.mismatched.append((key, tuple(ref.shape), tuple(given[key].shape)))
        else:
            report.loaded.append(key)
    report.unexpected = [k for k in given if k not in expected]
    return report


def load_official_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, Any],
    *,
    strict: bool = True,
    source: str | None = None,
) -> LoadReport:
    """Load an official-layout state dict (or a whole checkpoint dict) into ``model``.

    Args:
        model: a segmentor built from the matching zoo entry.
        state_dict: ``{"backbone.…": tensor, ...}``, or a checkpoint with it under ``state_dict``/``model``.
        strict: raise unless every key matches in name and shape. With ``strict=False`` the
            matching keys are loaded and the rest reported (used for the strategy-2 hand-off,
            where the class layer differs).
        source: name of the file, for messages.

    Returns:
        The :class:`LoadReport`.

    Raises:
        CheckpointError: strict mode and any missing, unexpected or mis-shaped key (all named).
    """
    tensors = unwrap_state_dict(state_dict)
    target = model.state_dict()
    report = compare_state_dict(target, tensors, source=source)
    if strict and not report.complete:
        raise CheckpointError("state dict does not match the model:\n" + report.summary())
    with torch.no_grad():
        for key in report.loaded:
            target[key].copy_(tensors[key].to(dtype=target[key].dtype))
    if not report.complete:
        log.warning("%s", report.summary())
    return report


def load_stage_checkpoint(
    model: nn.Module, state_dict: Mapping[str, Any], *, source: str | None = None
) -> LoadReport:
    """Initialise a strategy-2 stage from the previous stage's checkpoint (docs/reference.md §R2.2).

    The reference's ``load_from`` of the COCO-Stuff-164k Mask2Former into the ADE20K model: every
    entry whose name and shape match is copied (backbone, adapter, pixel decoder, transformer
    decoder, queries, level and mask embeddings); entries whose shape differs (the class layer
    ``decode_head.cls_embed``, 172 -> 151 rows) are skipped and their module is re-initialised with
    PyTorch's default init (``reset_parameters``), which is what the reference's freshly built
    model keeps for them. Unlike mmcv, names must match exactly: a missing or unexpected key means
    a checkpoint of another architecture and is an error.

    Args:
        model: the new stage's segmentor.
        state_dict: the previous stage's state dict or checkpoint (``state_dict``/``model`` wrappers).
        source: name of the file, for messages.

    Returns:
        The :class:`LoadReport` (``mismatched`` lists the re-initialised entries).

    Raises:
        CheckpointError: missing or unexpected keys, or a mismatched entry whose module has no
            ``reset_parameters``.
    """
    tensors = unwrap_state_dict(state_dict)
    report = compare_state_dict(model.state_dict(), tensors, source=source)
    if report.missing or report.unexpected:
        raise CheckpointError(
            "the checkpoint is not of the same architecture (only shapes may differ):\n" + report.summary()
        )
    owners = list(dict.fromkeys(key.rpartition(".")[0] for key, _, _ in report.mismatched))
    for owner in owners:
        reset = getattr(model.get_submodule(owner), "reset_parameters", None)
        if reset is None:
            raise CheckpointError(
                f"{owner}: its shape differs from the checkpoint's and the module has no reset_parameters"
            )
        with torch.no_grad():
            reset()
    # copies the matching entries (also those of a re-initialised module) and logs the skipped ones
    return load_official_state_dict(model, tensors, strict=False, source=source)


def export_official_state_dict(model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """The model's weights in the official layout (keys, shapes, dtypes and order), on the CPU."""
    return OrderedDict(
        (k, v.detach().to("cpu", copy=True).contiguous()) for k, v in model.state_dict().items()
    )


def _safe_globals() -> list[Any]:
    """Numpy scalar machinery mmcv leaves in checkpoint metadata (no code execution involved)."""
    names: list[Any] = [np.dtype, np.ndarray]
    multiarray = getattr(np, "_core", None) or np.core
    names.append(multiarray.multiarray.scalar)
    names.append(multiarray.multiarray._reconstruct)
    names.extend(type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool"))
    return names


def _is_torch_zip(archive: zipfile.ZipFile) -> bool:
    return any(name.endswith("/data.pkl") or name == "data.pkl" for name in archive.namelist())


def _open_checkpoint_bytes(path: Path) -> io.BytesIO | Path:
    """The path itself, or the bytes of the checkpoint inside a release ``.zip``."""
    if not zipfile.is_zipfile(path):
        return path
    with zipfile.ZipFile(path) as archive:
        if _is_torch_zip(archive):
            return path
        members = [
            n for n in archive.namelist() if n.endswith(CHECKPOINT_SUFFIXES) and not n.startswith("__MACOSX")
        ]
        if len(members) != 1:
            raise CheckpointError(
                f"{path}: a zip archive but not a PyTorch checkpoint, and it holds {len(members)} checkpoint "
                f"files ({', '.join(members) or 'none'}); expected exactly one {'/'.join(CHECKPOINT_SUFFIXES)}"
            )
        log.info("reading %s from the archive %s", members[0], path)
        return io.BytesIO(archive.read(members[0]))


def _load_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return dict(load_file(path, device="cpu"))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(
            f"{path} is not a readable safetensors file (truncated download?): {err}"
        ) from err


def load_checkpoint_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint file safely (``weights_only=True``), on the CPU.

    Args:
        path: a ``.pth``/``.pth.tar``/``.pt`` file, a release ``.zip`` containing exactly one, or a
            ``.safetensors`` state dict (timm's releases).

    Returns:
        The loaded object (a dict).

    Raises:
        FileNotFoundError: the file does not exist.
        CheckpointError: the file is truncated, not a PyTorch checkpoint, or holds objects that a
            weights-only load refuses.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    if path.suffix == ".safetensors":  # timm's releases of the extension trunks
        return _load_safetensors(path)
    try:
        source = _open_checkpoint_bytes(path)
        with torch.serialization.safe_globals(_safe_globals()):
            obj = torch.load(source, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as err:
        unsafe = _UNSAFE_GLOBAL.search(str(err))
        if unsafe:
            raise CheckpointError(
                f"refusing to load {path}: it holds a Python object ({unsafe.group(1)}) that only a full "
                "unpickling would rebuild, which can run arbitrary code; a checkpoint must hold tensors and plain "
                "values (re-save its state_dict from a trusted environment)"
            ) from None
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (truncated download or foreign file?): {detail}"
        ) from err
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    return dict(obj)
