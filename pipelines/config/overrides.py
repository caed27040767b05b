"""``--set PATH=VALUE`` parsing shared by the commands (the checks are :mod:`models.overrides`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import yaml


def parse_set_options(items: Sequence[str] | None) -> dict[str, Any]:
    """Turn ``["backbone.trunk.embed_dim=64", "data.eval.mode=whole"]`` into ``{path: value}``.

    Values are parsed as YAML (``64`` -> int, ``0.5`` -> float, ``[64, 64]`` -> list, ``true`` -> bool,
    ``null`` -> None). Keys stay as written: :func:`models.overrides.resolve_overrides` checks them
    against the zoo entry (full paths, the alias table, unique endings) with the value types. A key
    given again replaces its earlier value (the last one wins, as with other repeated flags).

    Raises:
        ValueError: an item without ``=`` or with an empty key, naming it.
    """
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected PATH=VALUE, e.g. --set backbone.trunk.embed_dim=64")
        out.pop(key, None)  # the last one wins
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ValueError(f"--set {item!r}: cannot parse the value: {err}") from err
    return out
