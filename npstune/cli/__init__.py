"""The ``npstune`` command line (DESIGN.md §8 is the contract).

Each subcommand lives in its own module ``npstune.cli.<name>`` and is imported only when
it runs, so ``npstune merge`` never pays for Ray or MLflow imports.
"""

from __future__ import annotations

import importlib
import logging
import sys

import click

from npstune.errors import NpstuneError

# name -> "module:attribute" of a click command; adding a subcommand touches one line
# here.
COMMANDS: dict[str, str] = {
    "merge": "npstune.cli.merge:merge",
    "methods": "npstune.cli.methods:methods",
    "compress": "npstune.cli.compress:compress",
    "decompress": "npstune.cli.compress:decompress",
    "inspect": "npstune.cli.compress:inspect",
    "zoo": "npstune.cli.zoo:zoo",
    "eval": "npstune.cli.eval:eval_cmd",
    "search": "npstune.cli.search:search",
    "bench": "npstune.cli.bench:bench",
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (
            ModuleNotFoundError
        ) as exc:  # a subcommand not built yet, or a missing extra
            if exc.name and exc.name.startswith("npstune"):
                return None
            raise


@click.group(cls=LazyGroup)
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(package_name="npstune")
def cli(verbose: int) -> None:
    """npstune: Neural Parameter Search for transfer, fusion and compression."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: any NpstuneError becomes one line on stderr and exit 1."""
    try:
        cli.main(args=argv, prog_name="npstune", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except NpstuneError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)
