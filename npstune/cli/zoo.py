"""`npstune zoo build|list`: the offline model zoo (DESIGN §7)."""

from __future__ import annotations

import json
import time
from typing import Any

import click

from npstune.cli import names
from npstune.cli.options import RegistryChoice

_CACHE = click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Zoo cache (default: $NPSTUNE_ZOO_DIR or ~/.cache/npstune/zoo).",
)


@click.group()
def zoo() -> None:
    """Build and list the offline model zoo."""


_FAMILY = click.option(
    "--family",
    type=RegistryChoice(names.zoo_families),
    default="text",
    show_default=True,
    help="text: a sentence encoder and classifiers; llm: SmolLM2-135M-Instruct and "
    "its experts.",
)


@zoo.command()
@_FAMILY
@click.option(
    "--size", type=RegistryChoice(names.zoo_sizes), default="small", show_default=True
)
@_CACHE
@click.option(
    "--threads", type=int, default=None, help="Torch threads (default: all cores)."
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def build(
    family: str, size: str, cache_dir: str | None, threads: int | None, quiet: bool
) -> None:
    """Build the zoo of SIZE (a no-op when it is already built with this recipe)."""
    from npstune.zoo import ZOO_FAMILIES

    builder = ZOO_FAMILIES[family].build
    t0 = time.perf_counter()
    z = builder(size, cache_dir=cache_dir, progress=not quiet, num_threads=threads)
    label = f"{size} {family} zoo" if family != "text" else f"{size} zoo"
    click.echo(f"{label} ready in {time.perf_counter() - t0:.1f} s: {z.root}")
    (_print_llm if family == "llm" else _print_tasks)(z.manifest)


@zoo.command(name="list")
@_FAMILY
@_CACHE
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_(family: str, cache_dir: str | None, as_json: bool) -> None:
    """Show each zoo size: built or not, its tasks and scores."""
    from npstune.zoo import ZOO_FAMILIES
    from npstune.zoo.core import read_manifest, resolve_cache_dir

    fam = ZOO_FAMILIES[family]
    cache = resolve_cache_dir(cache_dir)
    out: dict[str, dict[str, Any]] = {}
    for size, recipe in fam.sizes.items():
        root = fam.root(recipe, cache)
        m = read_manifest(root)
        out[size] = {
            "path": str(root),
            "status": m.get("status") if m else "not built",
            "tasks": list(recipe.tasks),
            "manifest": m,
        }
    if as_json:
        click.echo(
            json.dumps(
                {
                    s: {
                        **v,
                        "manifest": None,
                        ("scores" if family == "llm" else "accuracy"): {
                            t: e.get("scores", e.get("accuracy"))
                            for t, e in (v["manifest"] or {}).get("tasks", {}).items()
                        },
                    }
                    for s, v in out.items()
                },
                indent=2,
            )
        )
        return
    for size, v in out.items():
        click.echo(f"{size}: {v['status']}  ({v['path']})")
        if v["manifest"] and v["status"] == "built":
            (_print_llm if family == "llm" else _print_tasks)(v["manifest"])
        else:
            flag = f"--family {family} " if family != "text" else ""
            click.echo(
                f"  tasks: {', '.join(v['tasks'])}  "
                f"(npstune zoo build {flag}--size {size})"
            )


def _print_llm(manifest: dict) -> None:
    """Test scores: the base and each expert on every task (own task marked *)."""
    experts = list(manifest["recipe"]["tasks"])
    tasks = experts + list(manifest["recipe"].get("abilities", []))
    click.echo("  " + f"{'model':<14}" + "".join(f"{t:>13}" for t in tasks))
    rows = [("base", manifest["base"]["scores"], None)]
    rows += [(t, manifest["tasks"][t]["scores"], t) for t in experts]
    for name, scores, own in rows:
        cells = "".join(f"{scores[t]:>12.3f}{'*' if t == own else ' '}" for t in tasks)
        click.echo(f"  {name:<14}{cells}")


def _print_tasks(manifest: dict) -> None:
    click.echo(
        f"  {'task':<16} {'classes':>7} {'finetuned':>9} {'base+head':>9} {'probe':>6}"
    )
    for name, t in manifest["tasks"].items():
        a = t.get("accuracy", {})
        probe = f"{a['probe_test']:.3f}" if "probe_test" in a else "-"
        click.echo(
            f"  {name:<16} {t['num_classes']:>7} {a.get('finetuned_test', 0):>9.3f} "
            f"{a.get('base_head_test', 0):>9.3f} {probe:>6}"
        )
