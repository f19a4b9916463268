"""Lazy registries: a name -> ``"module:attr"`` table plus an entry-point group.

The merge methods and the evaluator kinds are both such tables; this is their loader.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, TypeVar

from npstune.errors import ConfigError

T = TypeVar("T")


def load_entry(
    what: str, name: str, table: Mapping[str, str], names: list[str], cls: type[T]
) -> T:
    """Import the object ``table[name]`` names; ConfigError for an unknown name (listing
    ``names``), an import failure or an object that is not a ``cls``."""
    target = table.get(name)
    if target is None:
        raise ConfigError(f"unknown {what} {name!r}; valid: {', '.join(names)}")
    module, attr = target.split(":")
    try:
        obj: Any = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            f"{what} {name!r} cannot be loaded from {target}: {exc}"
        ) from exc
    if not isinstance(obj, cls):
        raise ConfigError(f"{target} is not a {cls.__name__}")
    return obj
