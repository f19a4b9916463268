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


# ---- bench ---------------------------------------------------------------------------
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
    res = _invoke(
        "bench", name.replace("_", "-"), "--help"
    )  # search-cost == search_cost
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
    assert err == (
        "error: unknown benchmark 'nope'; valid: " + ", ".join(benchmarks.BENCHMARKS)
    )


# ---- choices and help lists from the registries --------------------------------------
def test_merge_methods_follow_the_merge_registry(monkeypatch):
    from npstune.merge import registry

    assert _choices("merge", "method") == registry.method_names()
    # a method added to the registry (as a plugin would be) is offered with no CLI edit
    monkeypatch.setitem(registry.METHODS, "x-fisher", "npstune.merge.fisher:SPEC")
    assert "x-fisher" in _choices("merge", "method")
    data = [n for n in registry.method_names() if registry.get_method(n).needs_data]
    assert "x-fisher" in data
    for opt in ("zoo_size", "evaluator_file"):
        assert _help_of("merge", opt).endswith("Methods: " + ", ".join(data) + ".")
    for opt, field in (
        ("k", "k"),
        ("lam", "lam"),
        ("q", "q"),
        ("seed", "seed"),
        ("subspaces", "subspaces"),
        ("tall_lam", "tall_lam"),
        ("consensus", "consensus"),
        ("weights", "weights"),
    ):
        users = [
            n
            for n in registry.method_names()
            if field in registry.get_method(n).params.model_fields
        ]
        assert users and _help_of("merge", opt).endswith(
            "Used by: " + ", ".join(users) + "."
        ), opt
    from npstune.merge.base import ADAPTER_METHODS

    assert _help_of("merge", "out_format").endswith(
        "Methods: " + ", ".join(ADAPTER_METHODS) + ". [default: model]"
    )


def test_compress_methods_follow_the_store_table(monkeypatch):
    from npstune.compress import store
    from npstune.compress.manifest import DTYPES

    assert _choices("compress", "method") == list(store.SPARSE_METHODS)
    monkeypatch.setitem(store.SPARSE_METHODS, "x-nps", "nps")
    assert _choices("compress", "method")[-1] == "x-nps"
    assert _help_of("compress", "subspaces").endswith("Used by: nps, x-nps.")
    assert _choices("compress", "value_dtype") == [
        n for n, d in DTYPES.items() if d.itemsize == 2
    ]


def test_search_backends_follow_the_backend_table(monkeypatch):
    from npstune.search import backends

    assert _choices("search", "backend") == sorted(backends.BACKENDS)
    monkeypatch.setitem(backends.BACKENDS, "x-backend", ("x:make", ()))
    assert "x-backend" in _choices("search", "backend")


def test_zoo_sizes_and_splits_follow_their_tables():
    from npstune.evaluate.kinds import SPLITS
    from npstune.zoo.recipe import ZOO_SIZES

    for cmd, opt in (("eval", "size"), ("merge", "zoo_size"), ("bench", "zoo_size")):
        assert _choices(cmd, opt) == sorted(ZOO_SIZES), cmd
    zoo = cli.get_command(click.Context(cli), "zoo")
    build = zoo.get_command(click.Context(zoo), "build")
    assert list(
        next(p for p in build.params if p.name == "size").type.choices
    ) == sorted(ZOO_SIZES)
    assert _choices("eval", "split") == list(SPLITS)


def test_an_unknown_choice_is_a_usage_error_naming_the_valid_ones():
    res = CliRunner().invoke(
        cli, ["merge", "--method", "tie", "--base", "b", "--models", "m", "--out", "o"]
    )
    assert res.exit_code == 2 and "'tie' is not one of" in res.output
    assert "'ties'" in res.output


def test_top_level_help_imports_no_torch():
    """`npstune --help` imports every command module (for the short help), so no module
    may import a registry (or torch) at import time."""
    code = (
        "import sys\nfrom npstune.cli import main\ntry:\n    main(['--help'])\n"
        "except SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'ray', 'npstune.merge', 'npstune.zoo',"
        " 'npstune.search.backends', 'benchmarks') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.splitlines()[-1] == "[]", out


# ---- methods --kinds -----------------------------------------------------------------
def test_methods_kinds_lists_every_evaluator_kind_with_its_options_schema():
    from npstune.evaluate.kinds import get_kind, kind_names

    rows = json.loads(_invoke("methods", "--kinds", "--json").output)
    assert [r["name"] for r in rows] == kind_names()
    for r in rows:
        kind = get_kind(r["name"])
        assert r["options"] == kind.options.model_json_schema()
        assert r["summary"] == kind.summary and r["needs_model"] == kind.needs_model
    text = _invoke("methods", "--kinds").output
    assert all(n in text for n in kind_names()) and "function=<required>" in text


def test_methods_json_is_still_the_method_list():
    from npstune.merge import method_names

    rows = json.loads(_invoke("methods", "--json").output)
    assert [r["name"] for r in rows] == method_names()
    assert set(rows[0]) == {
        "name",
        "summary",
        "paper",
        "needs_data",
        "prunable",
        "params",
    }
    by = {r["name"]: r for r in rows}
    assert by["tsv-m"]["prunable"] and not by["regmean"]["prunable"]
