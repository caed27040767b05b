"""Strict conversion of loaded YAML (or parsed flags) into frozen dataclasses.

Every key is checked: an unknown key, a wrong type, a value outside a ``Literal`` or outside a field's
declared range (``field(metadata={"min": 1})``) is a :class:`ParamsError` naming its path
(``runs.demo.train.max_iters``). ``None`` always means "not set" (the recipe's value), never 0. The value
checks are :mod:`models.values`' (the zoo overrides use the same ones).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from models import values
from models.values import check_value


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


def convert(value: Any, annotation: Any, where: str) -> Any:
    """Check ``value`` against ``annotation`` (dataclass, Literal, Optional, tuple, dict, scalars): the one
    checker of :mod:`models.values`, with sections built by :func:`build`."""
    return check_value(value, annotation, where, error=ParamsError, section=build)


def build(cls: type, raw: Any, where: str) -> Any:
    """Dataclass ``cls`` from mapping ``raw`` (None: all defaults), every key and value checked; ``where`` is
    the mapping's path in the file (``""`` for the top level)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{where}: expected a mapping, got {type(raw).__name__} {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ParamsError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(names))})")
    checked = {k: convert(v, hints[k], f"{where}.{k}" if where else k) for k, v in raw.items()}
    try:
        obj = cls(**checked)
    except TypeError as err:  # a required key is missing
        raise ParamsError(f"{where or 'params'}: {err}") from err
    check_ranges(obj, where)
    return obj


def check_ranges(obj: Any, where: str = "") -> None:
    """Check the range a dataclass field declares in its metadata (``min``, ...; None means "not set")."""
    values.check_ranges(obj, where, error=ParamsError, hints=UNSET_HINT)
