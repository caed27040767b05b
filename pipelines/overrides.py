"""``--set key=value`` parsing shared by the commands."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import yaml


def parse_set_options(items: Sequence[str] | None) -> dict[str, Any]:
    """Turn ``["embed_dim=64", "decode_head.channels=32"]`` into override keyword arguments.

    Values are parsed as YAML scalars/lists (``64`` -> int, ``0.5`` -> float, ``[1, 2]`` -> list,
    ``true`` -> bool). A dotted key ``section.field`` becomes ``section={"field": value}``.

    Raises:
        ValueError: an item without ``=`` or with an empty key, naming it.
    """
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ValueError(f"--set {item!r}: cannot parse the value: {err}") from err
        section, dot, field = key.partition(".")
        if dot:
            out.setdefault(section, {})
            if not isinstance(out[section], dict):
                raise ValueError(f"--set {item!r}: {section!r} was already set to a value")
            out[section][field] = value
        else:
            out[key] = value
    return out
