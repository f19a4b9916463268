"""``npstune bench NAME [--zoo SIZE] [ARGS...]``: run a benchmark module from
``benchmarks/``.

NAME is one of ``benchmarks.BENCHMARKS``; everything after NAME (``--help`` too) goes to
the module's own ``main(argv)``.
"""

from __future__ import annotations

import importlib

import click

from npstune.cli.names import benchmarks, zoo_sizes
from npstune.cli.options import RegistryChoice
from npstune.errors import ConfigError


class BenchCommand(click.Command):
    """Its help lists the benchmark table, read when the help is shown."""

    def format_help_text(
        self, ctx: click.Context, formatter: click.HelpFormatter
    ) -> None:
        super().format_help_text(ctx, formatter)
        try:
            from benchmarks import BENCHMARKS
        except ModuleNotFoundError:
            return
        with formatter.section("Benchmarks"):
            formatter.write_dl(list(BENCHMARKS.items()))


@click.command(
    "bench",
    cls=BenchCommand,
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@click.option(
    "--zoo",
    "zoo_size",
    default=None,
    type=RegistryChoice(zoo_sizes),
    help="Zoo size, passed on as the benchmark's --zoo.",
)
@click.argument("name")
@click.argument("extra", nargs=-1, type=click.UNPROCESSED)
def bench(zoo_size: str | None, name: str, extra: tuple[str, ...]) -> None:
    """Run benchmark NAME; it prints a table and writes
    benchmarks/results/NAME.md/.json.

    Arguments after NAME go to the benchmark (`npstune bench NAME --help` lists them).
    """
    mod_name = name.replace("-", "_")
    try:
        valid = benchmarks()
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"the benchmarks are not available ({exc}); run from a source "
            "checkout installed with `pip install -e .`"
        ) from exc
    if mod_name not in valid:
        raise ConfigError(f"unknown benchmark {name!r}; valid: {', '.join(valid)}")
    module = importlib.import_module(f"benchmarks.{mod_name}")
    argv = list(extra)
    if zoo_size:
        argv += ["--zoo", zoo_size]
    module.main(argv)
