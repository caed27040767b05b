"""Overrides of a zoo entry by dotted path, checked once for the Python API, ``--set`` and params.yaml.

A key names a field of :class:`models.config.SegmentorConfig` by its dotted path
(``backbone.trunk.embed_dim``, ``data.eval.mode``, ``decode_head.channels``). Three shorter forms are
accepted, each resolved to exactly one path or rejected with the candidates:

* a bare name from :data:`ALIASES` (the handful users type: ``embed_dim``, ``depth``, ``crop_size``,
  ``lr``, ...); no other bare name is accepted, so ``channels`` (decode or auxiliary head?) or ``mode``
  is an error that lists the full paths it could mean;
* a dotted key that is the unique ending of one path (``trunk.embed_dim``, ``eval.mode``);
* a section path with a mapping (``{"decode_head": {"channels": 32}}``), flattened to its fields.

Every value is checked against the field's type by the checker params.yaml uses too
(:mod:`models.values`): ``Literal`` options, tuples of the right length (lists from YAML or the command
line become tuples), ints, floats (any Python float literal: ``6e-5``, ``1e12``, ``.5``), bools, optional
values; and against the field's range where it declares one (a learning rate above 0, a dropout ratio
between 0 and 1; ``inf`` and ``nan`` are refused there). Fields
that identify the entry or its published numbers (``name``, ``reference_config``, ``head``,
``published.*``) are not overridable.

Dependent fields are derived, not repeated (each only when the override set does not name it):

* ``data.eval.crop_size`` follows ``data.train.crop_size`` (the reference tests with its training
  crop, docs/reference.md §R2.5);
* a BEiT trunk's ``img_size`` follows the crop (its relative-position tables fix the input size,
  docs/reference.md §P2);
* the multi-scale ``pad_short_side`` (Mask2Former entries) follows the crop;
* ``backbone.adapter.interaction_indexes`` (four equal groups) and the layer-decay depth
  ``optimizer.num_layers`` follow ``depth`` (docs/reference.md §R2.3).

:func:`models.config.validate` then rejects an inconsistent result (``num_classes`` against the
dataset's, the crop against a BEiT trunk's ``img_size``) with a message naming both values.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any

from models import values
from models.config import SegmentorConfig, even_interaction_indexes, validate

# the bare names accepted as shorthands, each for exactly one path (documented in README, "Overrides")
ALIASES: dict[str, str] = {
    "embed_dim": "backbone.trunk.embed_dim",
    "depth": "backbone.trunk.depth",
    "num_heads": "backbone.trunk.num_heads",
    "img_size": "backbone.trunk.img_size",
    "drop_path_rate": "backbone.trunk.drop_path_rate",
    "deform_num_heads": "backbone.adapter.deform_num_heads",
    "conv_inplane": "backbone.adapter.conv_inplane",
    "crop_size": "data.train.crop_size",
    "lr": "optimizer.lr",
    "weight_decay": "optimizer.weight_decay",
    "max_iters": "schedule.max_iters",
    "warmup_iters": "schedule.warmup_iters",
    "num_queries": "decode_head.num_queries",
}
# fields that say which entry this is and what was published: an override would make it another entry
FIXED_PATHS = ("name", "reference_config", "head", "published")

CROP = "data.train.crop_size"
EVAL_CROP = "data.eval.crop_size"
TRUNK_IMG_SIZE = "backbone.trunk.img_size"
MS_PAD = "data.eval.ms.pad_short_side"
DEPTH = "backbone.trunk.depth"
INTERACTIONS = "backbone.adapter.interaction_indexes"
DECAY_LAYERS = "optimizer.num_layers"


class OverrideError(ValueError):
    """An override names no field, several fields, or gives a value of the wrong type; the message says which."""


def field_paths(obj: Any, prefix: str = "") -> list[str]:
    """Every field path under dataclass instance ``obj`` (sections and leaves), in declaration order."""
    paths: list[str] = []
    for f in dataclasses.fields(obj):
        path = f"{prefix}{f.name}"
        paths.append(path)
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            paths += field_paths(value, f"{path}.")
    return paths


def _is_fixed(path: str) -> bool:
    return any(path == fixed or path.startswith(f"{fixed}.") for fixed in FIXED_PATHS)


def resolve_key(config: SegmentorConfig, key: str) -> str:
    """The full dotted path that override ``key`` names in ``config``.

    Raises:
        OverrideError: ``key`` names no field, or (a bare name outside :data:`ALIASES`, an ambiguous
            ending) several; the message lists the candidates.
    """
    paths = field_paths(config)
    where = f"override {key!r} of {config.name}"
    if key in paths:
        path = key
    elif key in ALIASES:
        path = ALIASES[key]
        if path not in paths:
            raise OverrideError(f"{where}: {key} stands for {path}, which this entry does not have")
    else:
        endings = [p for p in paths if p.endswith(f".{key}")]
        if "." in key and len(endings) == 1:
            path = endings[0]
        elif endings:
            kind = "is ambiguous" if len(endings) > 1 else "is not a shorthand"
            raise OverrideError(
                f"{where} {kind}: write the full path ({', '.join(endings)}); "
                f"bare names accepted: {', '.join(ALIASES)}"
            )
        else:
            near = [p for p in paths if p.rsplit(".", 1)[-1] in key or key.rsplit(".", 1)[-1] in p]
            hint = f"; similar paths: {', '.join(near[:8])}" if near else ""
            raise OverrideError(
                f"{where}: no such field{hint} (`vitadapter configs show {config.name}` lists them)"
            )
    if _is_fixed(path):
        raise OverrideError(f"{where}: {path} identifies the zoo entry and cannot be overridden")
    return path


def check_value(value: Any, annotation: Any, where: str) -> Any:
    """``value`` converted to ``annotation`` (lists to tuples, ints and float literals to floats), or an
    OverrideError naming ``where`` (the checker of :mod:`models.values`, shared with params.yaml)."""
    return values.check_value(value, annotation, where, error=OverrideError)


def _field_of(config: SegmentorConfig, path: str) -> tuple[Any, Mapping[str, Any]]:
    """The type annotation and the metadata (its range, :func:`models.values.bounds`) of the field at ``path``."""
    *sections, leaf = path.split(".")
    obj: Any = config
    for name in sections:
        obj = getattr(obj, name)
        if obj is None:
            raise OverrideError(f"override {path}: {name} is not set in {config.name}")
    metadata = next(f.metadata for f in dataclasses.fields(obj) if f.name == leaf)
    return typing.get_type_hints(type(obj))[leaf], metadata


def _set(obj: Any, parts: list[str], value: Any) -> Any:
    if len(parts) == 1:
        return dataclasses.replace(obj, **{parts[0]: value})
    child = getattr(obj, parts[0])
    return dataclasses.replace(obj, **{parts[0]: _set(child, parts[1:], value)})


def get_path(config: SegmentorConfig, path: str) -> Any:
    """The value at dotted ``path`` (None when a section on the way is unset)."""
    obj: Any = config
    for name in path.split("."):
        if obj is None:
            return None
        obj = getattr(obj, name)
    return obj


def flatten_overrides(overrides: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings (``{"decode_head": {"channels": 32}}``) as dotted keys; no config field holds a dict."""
    flat: dict[str, Any] = {}
    for key, value in overrides.items():
        if not isinstance(key, str) or not key:
            raise OverrideError(f"override key {key!r} must be a non-empty string")
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_overrides(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def resolve_overrides(config: SegmentorConfig, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``overrides`` as ``{full path: checked value}``; two keys naming one field are an error."""
    resolved: dict[str, Any] = {}
    given: dict[str, str] = {}
    for key, value in flatten_overrides(overrides).items():
        path = resolve_key(config, key)
        if path in resolved:
            raise OverrideError(f"overrides {given[path]!r} and {key!r} both set {path}")
        given[path] = key
        annotation, metadata = _field_of(config, path)
        checked = check_value(value, annotation, f"override {path}")
        values.check_range(checked, metadata, f"override {path}", error=OverrideError)
        resolved[path] = checked
    return resolved


def _derived(config: SegmentorConfig, explicit: set[str]) -> dict[str, Any]:
    """The dependent fields to follow the explicitly set ones (see the module docstring)."""
    derived: dict[str, Any] = {}
    if CROP in explicit:
        crop = config.data.train.crop_size
        if EVAL_CROP not in explicit:
            derived[EVAL_CROP] = crop
        if config.backbone.trunk.kind == "beit" and TRUNK_IMG_SIZE not in explicit:
            derived[TRUNK_IMG_SIZE] = crop[0]
        ms = config.data.eval.ms
        if ms is not None and ms.pad_short_side is not None and MS_PAD not in explicit:
            derived[MS_PAD] = crop[0]
    if DEPTH in explicit:
        depth = config.backbone.trunk.depth
        if INTERACTIONS not in explicit:
            derived[INTERACTIONS] = even_interaction_indexes(depth)
        if DECAY_LAYERS not in explicit and config.optimizer.num_layers is not None:
            derived[DECAY_LAYERS] = depth
    return derived


def apply_overrides(
    config: SegmentorConfig, overrides: Mapping[str, Any] | None = None, /, **more: Any
) -> SegmentorConfig:
    """``config`` with ``overrides`` (and keyword overrides) applied, dependent fields derived, validated.

    Args:
        config: the zoo entry.
        overrides: ``{dotted path or alias: value}``; a section path may take a mapping of its fields.
        **more: further overrides as keywords (``embed_dim=64``; dotted keys through ``**{...}``).

    Raises:
        OverrideError: an unknown or ambiguous key, a fixed field, or a value of the wrong type.
        ValueError: the result is inconsistent (:func:`models.config.validate`).
    """
    resolved = resolve_overrides(config, {**(overrides or {}), **more})
    result: Any = config
    for path, value in resolved.items():
        result = _set(result, path.split("."), value)
    for path, value in _derived(result, set(resolved)).items():
        result = _set(result, path.split("."), value)
    validate(result)
    return result
