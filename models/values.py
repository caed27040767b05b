"""One strict check of a value against a type annotation, for every setting a user types.

The zoo overrides (:mod:`models.overrides`: the Python API, ``--set`` and params.yaml's ``overrides``) and
params.yaml with the command-line knobs (:mod:`pipelines.config.strict`) all go through :func:`check_value`
and :func:`check_range`; only the error class and how a dataclass section is built differ between them.
Torch-free, like the zoo (listing configs stays instant).

Rules:

* ``Literal`` options; ``Optional`` and other unions (``None`` means "not set"); tuples (a list from YAML or
  the command line becomes a tuple; a fixed-length tuple checks its length); ``dict[str, X]``; ``Any``;
  a dataclass section through the caller's ``section`` hook (without one it is refused: an override sets a
  section's fields, not the section);
* a float field takes an int, or a string holding a Python float literal (``6e-5``, ``1e12``, ``1E3``,
  ``.5``, ``inf``): YAML 1.1, which PyYAML reads, takes a number with an exponent as a float only with a dot
  and a signed exponent (``1.0e+12``), so ``6e-5``, the reference configs' own spelling, arrives as a string;
* an int field refuses a bool; any other scalar must be an instance of its type.

Ranges are declared in a dataclass field's metadata (:func:`bounds`): ``min``/``max`` inclusive, ``gt``/``lt``
exclusive, applied to each element of a tuple. A value outside its range, and an infinite or NaN float
where a range applies, is an error naming the setting, the value and the range.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal

# builds a dataclass section from a mapping: (class, value, where) -> instance
SectionHook = Callable[[type, Any, str], Any]
RANGE_KEYS = ("min", "max", "gt", "lt")


def type_name(annotation: Any) -> str:
    """How an annotation reads in a message (``float``, ``tuple[int, int]``)."""
    if typing.get_origin(annotation) is None and hasattr(annotation, "__name__"):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def parse_float(value: Any) -> float | None:
    """``value`` as a float when it is an int or a string holding a Python float literal, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)  # the literal's grammar: digits, '_', '.', an exponent, inf, nan
        except ValueError:
            return None
    return None


def check_value(
    value: Any,
    annotation: Any,
    where: str,
    *,
    error: type[Exception] = ValueError,
    section: SectionHook | None = None,
) -> Any:
    """``value`` checked against ``annotation`` and converted (lists to tuples, ints and float literals to floats).

    Args:
        value: what the user gave (parsed YAML or a flag's value).
        annotation: the field's type.
        where: the setting's name for messages (``override optimizer.lr``, ``runs.demo.train.seed``).
        error: the exception raised (a ``ValueError`` subclass of the caller's).
        section: builds a dataclass section from a mapping; None: a dataclass annotation is refused.

    Raises:
        error: the value does not fit, naming ``where``, the value and what was expected.
    """
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return check_value(value, option, where, error=error, section=section)
            except error as err:
                errors.append(str(err))
        raise error(errors[0] if len(errors) == 1 else f"{where}={value!r}: expected {type_name(annotation)}")
    if origin is Literal:
        if value not in args:
            raise error(f"{where}={value!r}: allowed values are {', '.join(repr(a) for a in args)}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise error(f"{where}={value!r}: expected a list ({type_name(annotation)})")
        if len(args) == 2 and args[1] is Ellipsis:
            kinds = [args[0]] * len(value)
        elif len(value) != len(args):
            raise error(f"{where}={value!r}: expected {len(args)} values ({type_name(annotation)})")
        else:
            kinds = list(args)
        return tuple(
            check_value(v, kind, f"{where}[{i}]", error=error, section=section)
            for i, (v, kind) in enumerate(zip(value, kinds, strict=True))
        )
    if origin is dict:
        if not isinstance(value, Mapping):
            raise error(f"{where}={value!r}: expected a mapping")
        return {
            str(k): check_value(v, args[1], f"{where}.{k}", error=error, section=section)
            for k, v in value.items()
        }
    if dataclasses.is_dataclass(annotation):
        if section is None:
            raise error(f"{where} is a section: set its fields ({where}.<field>=...)")
        return section(annotation, value, where)
    if annotation is Any:
        return value
    if annotation is float:
        number = parse_float(value)
        if number is None:
            raise error(f"{where}={value!r}: expected float (a number such as 6e-5, 0.5 or 1e3)")
        return number
    if annotation is int and isinstance(value, bool):
        raise error(f"{where}={value!r}: expected int")
    if isinstance(annotation, type) and not isinstance(value, annotation):
        raise error(f"{where}={value!r}: expected {type_name(annotation)}")
    return value


def bounds(
    *, min: float | None = None, max: float | None = None, gt: float | None = None, lt: float | None = None
) -> dict[str, float]:
    """A field's range as dataclass metadata (``field(metadata=bounds(gt=0))``): ``min``/``max`` inclusive,
    ``gt``/``lt`` exclusive."""
    given = {"min": min, "max": max, "gt": gt, "lt": lt}
    return {key: value for key, value in given.items() if value is not None}


def describe_range(metadata: Mapping[str, Any]) -> str:
    """The range of ``metadata`` in words (``at least 1``, ``above 0 and at most 1``)."""
    words = {"min": "at least", "gt": "above", "max": "at most", "lt": "below"}
    return " and ".join(
        f"{words[key]} {metadata[key]}" for key in RANGE_KEYS if metadata.get(key) is not None
    )


def _in_range(value: Any, metadata: Mapping[str, Any]) -> bool:
    if isinstance(value, float) and not math.isfinite(value):
        return False
    checks = {
        "min": lambda low: value >= low,
        "max": lambda high: value <= high,
        "gt": lambda low: value > low,
        "lt": lambda high: value < high,
    }
    return all(checks[key](metadata[key]) for key in RANGE_KEYS if metadata.get(key) is not None)


def check_range(
    value: Any,
    metadata: Mapping[str, Any],
    where: str,
    *,
    error: type[Exception] = ValueError,
    hint: str = "",
) -> None:
    """Refuse ``value`` (each element of a tuple) outside the range its field declares in ``metadata``.

    ``None`` is "not set" and always passes; an infinite or NaN float never does where a range applies.

    Raises:
        error: ``{where}: {value!r} is out of range ({range}{hint})``.
    """
    if value is None or not any(metadata.get(key) is not None for key in RANGE_KEYS):
        return
    for item in value if isinstance(value, tuple) else (value,):
        if isinstance(item, int | float) and not isinstance(item, bool) and not _in_range(item, metadata):
            shown = value if isinstance(value, tuple) else item
            finite = "a finite number " if isinstance(item, float) and not math.isfinite(item) else ""
            raise error(f"{where}: {shown!r} is out of range ({finite}{describe_range(metadata)}{hint})")


def check_ranges(
    obj: Any, where: str = "", *, error: type[Exception] = ValueError, hints: Mapping[str, str] | None = None
) -> None:
    """:func:`check_range` on every field of dataclass instance ``obj`` (``hints``: per field, appended)."""
    for f in dataclasses.fields(obj):
        name = f"{where}.{f.name}" if where else f.name
        check_range(getattr(obj, f.name), f.metadata, name, error=error, hint=(hints or {}).get(f.name, ""))
