"""``npstune methods``: list every merge method with its parameters (JSON schema)."""

from __future__ import annotations

import json

import click


@click.command("methods")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def methods(as_json: bool) -> None:
    """List merge methods, their parameters and defaults."""
    from npstune.merge import get_method, method_names

    rows = []
    for name in method_names():
        spec = get_method(name)
        rows.append({"name": name, "summary": spec.summary, "paper": spec.paper,
                     "needs_data": spec.needs_data, "params": spec.params.model_json_schema()})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        props = r["params"].get("properties", {})
        ps = ", ".join(f"{k}={v.get('default')}" for k, v in props.items()) or "-"
        click.echo(f"{r['name']:16s} {ps}\n{'':16s} {r['summary']}")
