"""Strict conversion of loaded YAML (or parsed flags) into frozen dataclasses.

Every key is checked: an unknown key, a wrong type, a value outside a ``Literal`` or below a field's
declared minimum (``field(metadata={"min": 1})``) is a :class:`ParamsError` naming its path
(``runs.demo.train.max_iters``). ``None`` always means "not set" (the recipe's value), never 0.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal


class ParamsError(ValueError):
    """A setting is invalid; the message names the file or flag and the key."""


# how to ask for the recipe's value instead of an out-of-range number
UNSET_HINT = {
    "max_iters": "; leave it unset for the recipe's",
    "eval_interval": "; leave it unset for the recipe's",
    "checkpoint_interval": "; leave it unset for the recipe's",
    "log_interval": "; leave it unset for the recipe's",
    "batch_size": "; leave it unset for the plan's",
    "global_batch": "; leave it unset for the recipe's",
}


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def convert(value: Any, annotation: Any, where: str) -> Any:
    """Check ``value`` against ``annotation`` (dataclass, Literal, Optional, tuple, dict, scalars)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return convert(value, option, where)
            except ParamsError as err:
                errors.append(str(err))
        raise ParamsError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {annotation}")
    if origin is Literal:
        if value not in args:
            raise ParamsError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(annotation):
        return build(annotation, value, where)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ParamsError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return tuple(convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{where}: expected a mapping, got {type(value).__name__}")
        return {str(k): convert(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if annotation is Any:
        return value
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is int and isinstance(value, bool):
        raise ParamsError(f"{where}: expected int, got bool {value!r}")
    if isinstance(annotation, type) and not isinstance(value, annotation):
        raise ParamsError(f"{where}: expected {_type_name(annotation)}, got {type(value).__name__} {value!r}")
    return value


def build(cls: type, raw: Any, where: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{where}: expected a mapping, got {type(raw).__name__} {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ParamsError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(names))})")
    values = {k: convert(v, hints[k], f"{where}.{k}" if where else k) for k, v in raw.items()}
    try:
        obj = cls(**values)
    except TypeError as err:  # a required key is missing
        raise ParamsError(f"{where or 'params'}: {err}") from err
    check_ranges(obj, where)
    return obj


def check_ranges(obj: Any, where: str = "") -> None:
    """Check the ``min`` bound a dataclass field declares in its metadata (None means "not set")."""
    for f in dataclasses.fields(obj):
        low = f.metadata.get("min")
        value = getattr(obj, f.name)
        if low is not None and value is not None and value < low:
            name = f"{where}.{f.name}" if where else f.name
            raise ParamsError(
                f"{name}: {value!r} is out of range (at least {low}{UNSET_HINT.get(f.name, '')})"
            )
