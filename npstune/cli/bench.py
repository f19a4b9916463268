"""``npstune bench NAME [--zoo SIZE]``: run a benchmark module from ``benchmarks/``."""

from __future__ import annotations

import importlib

import click

from npstune.errors import ConfigError

BENCHMARKS = ("fusion", "transfer", "compression", "ablations", "search_cost", "speed",
              "compression_storage", "search_overhead")


@click.command("bench", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.option("--zoo", "zoo_size", default=None, help="Zoo size (small or full).")
@click.argument("extra", nargs=-1, type=click.UNPROCESSED)
def bench(name: str, zoo_size: str | None, extra: tuple[str, ...]) -> None:
    """Run benchmark NAME; it prints a table and writes benchmarks/results/NAME.md/.json."""
    mod_name = name.replace("-", "_")
    if mod_name not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {name!r}; valid: {', '.join(BENCHMARKS)}")
    try:
        module = importlib.import_module(f"benchmarks.{mod_name}")
    except ModuleNotFoundError as exc:
        raise ConfigError(f"benchmark {name!r} is not available ({exc}); run from a source "
                          "checkout installed with `pip install -e .`") from exc
    argv = list(extra)
    if zoo_size:
        argv += ["--zoo", zoo_size]
    module.main(argv)
