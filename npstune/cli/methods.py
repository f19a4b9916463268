"""``npstune methods [--kinds] [--json]``: list every merge method with its parameters
(JSON schema), or with ``--kinds`` every evaluator kind with its options (JSON
schema)."""

from __future__ import annotations

import json

import click


@click.command("methods")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--kinds",
    is_flag=True,
    help="List the evaluator kinds (evaluator files' `kind:`) and their options "
    "instead.",
)
def methods(as_json: bool, kinds: bool) -> None:
    """List merge methods, their parameters and defaults (--kinds: evaluator kinds)."""
    rows = _kind_rows() if kinds else _method_rows()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    key, w = ("options", 20) if kinds else ("params", 16)
    for r in rows:
        props = r[key].get("properties", {})
        if kinds:
            props = {k: v for k, v in props.items() if k != "tasks"}
        required = set(r[key].get("required", ()))
        ps = (
            ", ".join(
                f"{k}=<required>" if k in required else f"{k}={v.get('default')}"
                for k, v in props.items()
            )
            or "-"
        )
        click.echo(f"{r['name']:{w}s} {ps}\n{'':{w}s} {r['summary']}")


def _method_rows() -> list[dict]:
    from npstune.merge import get_method, method_names

    rows = []
    for name in method_names():
        spec = get_method(name)
        rows.append(
            {
                "name": name,
                "summary": spec.summary,
                "paper": spec.paper,
                "needs_data": spec.needs_data,
                "prunable": not spec.needs_data,  # takes --prune (merges τ)
                "params": spec.params.model_json_schema(),
            }
        )
    return rows


def _kind_rows() -> list[dict]:
    from npstune.evaluate.kinds import get_kind, kind_names

    rows = []
    for name in kind_names():
        kind = get_kind(name)
        rows.append(
            {
                "name": name,
                "summary": kind.summary,
                "needs_model": kind.needs_model,
                "options": kind.options.model_json_schema(),
            }
        )
    return rows
