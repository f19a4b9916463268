"""Method registry: CLI name -> ``"module:SPEC"``, imported on first use.

Adding a method touches one line here (or, for plugins, an entry point in the
``npstune.merge_methods`` group pointing at a :class:`~npstune.merge.base.MergeSpec`).
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from npstune.merge.base import MergeSpec

METHODS: dict[str, str] = {
    "average": "npstune.merge.average:SPEC",
    "task-arithmetic": "npstune.merge.task_arithmetic:SPEC",
    "ties": "npstune.merge.ties:SPEC",
    "dare": "npstune.merge.dare:SPEC",
    "darex": "npstune.merge.dare:DAREX_SPEC",
    "magnitude": "npstune.merge.magnitude:SPEC",
    "consensus-ta": "npstune.merge.consensus:TA_SPEC",
    "consensus-ties": "npstune.merge.consensus:TIES_SPEC",
    "nps": "npstune.merge.nps:SPEC",
    "fisher": "npstune.merge.fisher:SPEC",
    "regmean": "npstune.merge.regmean:SPEC",
    "tsv-m": "npstune.merge.tsv_m:SPEC",
    "iso-c": "npstune.merge.iso:C_SPEC",
    "iso-cts": "npstune.merge.iso:CTS_SPEC",
    "wudi": "npstune.merge.wudi:SPEC",
    "emr": "npstune.merge.emr:SPEC",
    "pcb": "npstune.merge.pcb:SPEC",
    "grafting": "npstune.merge.grafting:SPEC",
    "tailor": "npstune.merge.tailor:SPEC",
}


def _plugins() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group="npstune.merge_methods")}


def method_names() -> list[str]:
    """Every registered method name (built-ins and plugins)."""
    return sorted({**METHODS, **_plugins()})


def get_method(name: str) -> MergeSpec[Any]:
    """The spec registered under ``name``; ConfigError listing valid names otherwise."""
    from npstune.lazy import load_entry

    return load_entry(
        "method", name, {**_plugins(), **METHODS}, method_names(), MergeSpec
    )
