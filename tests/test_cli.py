"""The command line against its registries: every choice and help list comes from the
registry it names (so a new method, backend, kind or benchmark needs no CLI edit), every
benchmark the bench command lists can be called through it, and `npstune --help` stays
light (no torch)."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from npstune.cli import cli

ROOT = Path(__file__).resolve().parents[1]


def _invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _param(command: str, name: str) -> click.Parameter:
    cmd = cli.get_command(click.Context(cli), command)
    return next(p for p in cmd.params if p.name == name)


def _choices(command: str, name: str) -> list[str]:
    return list(_param(command, name).type.choices)


def _help_of(command: str, option: str) -> str:
    cmd = cli.get_command(click.Context(cli), command)
    p = next(p for p in cmd.params if p.name == option)
    return " ".join(p.get_help_record(click.Context(cmd))[1].split())


# ---- bench ------------------------------------------------------------------------------
def _benchmark_names() -> list[str]:
    from benchmarks import BENCHMARKS

    return list(BENCHMARKS)


def test_benchmark_table_is_every_module_with_a_main():
    """One table: each benchmarks/NAME.py with a main() is listed, nothing else is."""
    import benchmarks

    found = []
    for m in pkgutil.iter_modules(benchmarks.__path__):
        text = (ROOT / "benchmarks" / f"{m.name}.py").read_text()
        if "\ndef main(" in text:
            found.append(m.name)
    assert sorted(_benchmark_names()) == sorted(found)


@pytest.mark.parametrize("name", _benchmark_names())
def test_bench_name_help_reaches_the_module(name):
    """`npstune bench NAME --help` calls benchmarks.NAME.main(["--help"]): a main that
    takes no argv (a TypeError) or does not parse it cannot come back."""
    res = _invoke("bench", name, "--help")
    assert res.exit_code == 0, res.output
    assert res.output.startswith(f"usage: python -m benchmarks.{name} "), res.output
    res = _invoke("bench", name.replace("_", "-"), "--help")  # search-cost == search_cost
    assert res.exit_code == 0 and f"benchmarks.{name}" in res.output


def test_bench_passes_arguments_after_name_to_the_module(monkeypatch):
    import benchmarks.speed

    seen = []
    monkeypatch.setattr(benchmarks.speed, "main", lambda argv=None: seen.append(argv))
    assert _invoke("bench", "--zoo", "small", "speed", "--parts", "peer").exit_code == 0
    assert seen == [["--parts", "peer", "--zoo", "small"]]


def test_bench_help_lists_the_table_and_unknown_names_are_one_line(monkeypatch, capsys):
    import benchmarks

    out = _invoke("bench", "--help").output
    assert all(n in out for n in _benchmark_names())
    monkeypatch.setitem(benchmarks.BENCHMARKS, "extra_bench", "added to the table")
    assert "extra_bench" in _invoke("bench", "--help").output
    from npstune.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["bench", "nope"])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err == ("error: unknown benchmark 'nope'; valid: "
                   + ", ".join(benchmarks.BENCHMARKS))
