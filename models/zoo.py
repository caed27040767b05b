"""The model zoo: every entry by name, torch-free (the entries themselves: :mod:`models.zoo_entries` and
:mod:`models.zoo_extensions`).

``get_config(name, overrides, preset=...)`` gives an entry with its overrides applied and checked
(:mod:`models.overrides`); ``list_configs`` lists the published entries (and, on request, the extensions).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from models.config import SegmentorConfig, validate
from models.zoo_entries import published_entries

_ZOO: dict[str, SegmentorConfig] = {}
for _entry in published_entries():
    validate(_entry)
    _ZOO[_entry.name] = _entry


def _register_extensions() -> None:
    """Add the extension entries (DINOv3/DINOv2/EVA-02 trunks, no published numbers) after the published ones."""
    from models.zoo_extensions import extension_entries

    for entry in extension_entries():
        validate(entry)
        _ZOO[entry.name] = entry


_register_extensions()


def list_configs(
    *, head: str | None = None, dataset: str | None = None, extensions: bool = False
) -> list[str]:
    """Names of the zoo entries, optionally filtered by head kind and dataset, in table order.

    The extension entries (``published.extension``, :mod:`models.zoo_extensions`) are not published
    rows: they are listed (last) only with ``extensions=True``.
    """
    return [
        name
        for name, cfg in _ZOO.items()
        if (extensions or not cfg.published.extension)
        and (head is None or cfg.head == head)
        and (dataset is None or cfg.data.dataset == dataset)
    ]


def get_config(
    name: str, overrides: Mapping[str, Any] | None = None, /, *, preset: str | None = None, **more: Any
) -> SegmentorConfig:
    """The zoo entry ``name``, optionally shrunk by a preset and changed by overrides.

    Args:
        name: zoo entry (a trailing ``_ss``/``_ms`` is accepted: the mode is an evaluation setting).
        overrides: ``{dotted path or alias: value}`` (:mod:`models.overrides`).
        preset: a named set of overrides applied first (:data:`models.presets.PRESETS`, e.g. ``"tiny"``).
        **more: further overrides as keywords.

    Raises:
        KeyError: unknown name; the message lists the known names.
        ValueError: an unknown preset, a bad override or an inconsistent result, naming it.
    """
    from models.overrides import apply_overrides

    config = _entry(name)
    merged = resolved_overrides(config, overrides, preset=preset, **more)
    return apply_overrides(config, merged) if merged else config


def _entry(name: str) -> SegmentorConfig:
    try:
        return _ZOO[name.removesuffix("_ss").removesuffix("_ms")]
    except KeyError:
        raise KeyError(f"unknown zoo entry {name!r}; known: {', '.join(_ZOO)}") from None


def resolved_overrides(
    name: str | SegmentorConfig,
    overrides: Mapping[str, Any] | None = None,
    /,
    *,
    preset: str | None = None,
    **more: Any,
) -> dict[str, Any]:
    """The preset's and the given overrides as one ``{full path: checked value}`` (later layers win).

    This is what a checkpoint records: rebuilding the entry from it needs no preset and no alias.
    """
    from models.overrides import resolve_overrides
    from models.presets import preset_overrides

    config = _entry(name) if isinstance(name, str) else name
    merged: dict[str, Any] = {}
    for layer in (preset_overrides(config, preset), overrides or {}, more):
        merged.update(resolve_overrides(config, layer))
    return merged
