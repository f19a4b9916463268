"""``npstune compress | decompress | inspect``: the sparse task-vector store
(DESIGN §8)."""

from __future__ import annotations

import json

import click

from npstune.cli import names
from npstune.cli.options import (
    GreedyOption,
    HelpFromRegistry,
    RegistryChoice,
    check_output,
    parse_floats,
)


def _used_by(field: str) -> dict:
    """Option settings whose help ends with the compress methods that take ``field``."""
    return {
        "cls": HelpFromRegistry,
        "help_names": ("Used by: ", lambda: names.sparse_methods_with(field)),
    }


@click.command("compress")
@click.option("--base", required=True, type=click.Path(), help="Pretrained checkpoint.")
@click.option(
    "--models",
    required=True,
    cls=GreedyOption,
    type=click.Path(),
    help="Fine-tuned checkpoints (one task each; NAME = file stem).",
)
@click.option(
    "--out", required=True, type=click.Path(), help="Store directory to write."
)
@click.option(
    "--method",
    default="nps",
    show_default=True,
    type=RegistryChoice(names.sparse_methods),
    help="How each task vector is pruned.",
)
@click.option(
    "--k",
    "k",
    type=float,
    help="Keep ratio in (0, 1] (NPS default 0.05).",
    **_used_by("k"),
)
@click.option(
    "--weights",
    help="NPS weights: M values, or T·M values task-major (default 1).",
    **_used_by("weights"),
)
@click.option("--lam", type=float, help="Scaling λ (default 1).", **_used_by("lam"))
@click.option(
    "--scope",
    type=click.Choice(["global", "tensor"]),
    help="Top-k ranking scope.",
    **_used_by("scope"),
)
@click.option(
    "--subspaces", type=int, help="NPS subspace count M.", **_used_by("subspaces")
)
@click.option("--seed", type=int, help="Seed of the random masks.", **_used_by("seed"))
@click.option(
    "--q", type=float, help="DAREx rescaling denominator q in [k, 1].", **_used_by("q")
)
@click.option(
    "--value-dtype",
    type=RegistryChoice(names.value_dtypes),
    help="Store values in 16 bits (lossy). Default: each tensor's dtype, lossless.",
)
@click.option("--copy-base", is_flag=True, help="Copy the base into the store.")
@click.option(
    "--include", multiple=True, help="Glob of keys that take part (repeatable)."
)
@click.option(
    "--exclude", multiple=True, help="Glob of keys copied from the base (repeatable)."
)
@click.option(
    "--zstd-level", default=3, show_default=True, type=int, help="zstd level 1-22."
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def compress(
    base,
    models,
    out,
    method,
    k,
    weights,
    lam,
    scope,
    subspaces,
    seed,
    q,
    value_dtype,
    copy_base,
    include,
    exclude,
    zstd_level,
    quiet,
) -> None:
    """Store BASE once plus, per model, the kept entries of its pruned task vector."""
    from npstune.compress import compress as run

    given = {
        "k": k,
        "lam": lam,
        "scope": scope,
        "subspaces": subspaces,
        "seed": seed,
        "q": q,
        "weights": parse_floats(weights, "--weights"),
    }
    check_output(out, [base, *models])
    m = run(
        base,
        list(models),
        out,
        method,
        {n: v for n, v in given.items() if v is not None},
        value_dtype=value_dtype,
        include=include or None,
        exclude=exclude or None,
        copy_base=copy_base,
        zstd_level=zstd_level,
        progress=not quiet,
    )
    kept = {t.name: t.kept for t in m.tasks}
    click.echo(f"wrote {out}  " + json.dumps({"method": method, "kept": kept}))


@click.command("decompress")
@click.argument("store", type=click.Path())
@click.option("--task", required=True, help="Task NAME (see npstune inspect).")
@click.option(
    "--out", required=True, type=click.Path(), help="Output (the base's form)."
)
@click.option(
    "--base", type=click.Path(), help="The base, if it moved (its hash is checked)."
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def decompress(store, task, out, base, quiet) -> None:
    """Rebuild task NAME of STORE exactly as `npstune merge` writes it."""
    from npstune.compress import decompress as run

    check_output(out, [store] + ([base] if base else []))
    run(store, task, out, base=base, progress=not quiet)
    click.echo(f"wrote {out}")


@click.command("inspect")
@click.argument("store", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(store, as_json) -> None:
    """Storage table of STORE: the paper's bits and the bytes on disk,
    per task and total."""
    from npstune.compress import inspect_store

    r = inspect_store(store)
    if as_json:
        click.echo(json.dumps(r, indent=1))
        return
    p = r["params"]
    click.echo(
        f"{r['store']}: {r['method']} k={p.get('k')} λ={p.get('lam')} "
        f"values={r['value_dtype'] or 'own dtype (lossless)'}; {r['tasks_count']} "
        f"tasks, N={r['n']:,} merged params, {r['frozen']:,} base-only"
    )
    row = "{:<24} {:>12} {:>16} {:>14} {:>7}"
    click.echo(row.format("part", "kept", "paper bits", "disk bytes", "ratio"))
    for t in r["tasks"]:
        click.echo(
            row.format(
                t["name"][:24],
                f"{t['kept']:,}",
                f"{t['paper_bits']:,}",
                f"{t['disk_bytes']:,}",
                f"{t['ratio']:.3f}",
            )
        )
    s, b, tot = r["sparse"], r["base"], r["total"]
    click.echo(
        row.format(
            "tasks + manifest",
            "",
            f"{s['paper_bits']:,}",
            f"{s['disk_bytes']:,}",
            f"{s['ratio']:.3f}",
        )
    )
    where = "copied" if b["copied"] else "referenced"
    click.echo(
        row.format(
            f"base ({where})",
            "",
            f"{b['paper_bits'] + b['frozen_bits']:,}",
            f"{b['disk_bytes']:,}",
            "",
        )
    )
    click.echo(
        row.format(
            "total",
            "",
            f"{tot['total_bits']:,}",
            f"{tot['disk_bytes']:,}",
            f"{8 * tot['disk_bytes'] / tot['total_bits']:.3f}",
        )
    )
    click.echo(
        "paper bits of the alternatives (+ base-only bits): "
        + ", ".join(f"{n} {v['paper_bits']:,}" for n, v in r["methods"].items())
    )
