"""The suite's own rules, read from the test files' syntax trees (no test is run):

- A test that needs the zoo gets it from conftest's ``small_zoo`` (built or reused),
  never from a local fixture that skips when the zoo is missing.
- No test asserts a wall-clock bound (a difference of clock readings): timing targets
  belong in ``benchmarks/``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
FILES = sorted(p for p in TESTS.glob("*.py") if p.name != "conftest.py")
ZOO_FIXTURES = {"small_zoo", "zoo_sources"}
CLOCKS = {"perf_counter", "time", "monotonic", "perf_counter_ns", "monotonic_ns"}


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _is_fixture(fn: ast.FunctionDef) -> bool:
    return any(_dotted(d.func if isinstance(d, ast.Call) else d).endswith("fixture")
               for d in fn.decorator_list)


def test_the_zoo_comes_from_conftest_and_never_skips():
    for path in FILES:
        tree = _tree(path)
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and _is_fixture(node):
                assert node.name not in ZOO_FIXTURES, (
                    f"{path.name} defines its own {node.name} fixture: use conftest's "
                    "(it builds or reuses the zoo)")
            if isinstance(node, ast.Call) and _dotted(node.func) == "pytest.skip":
                text = ast.unparse(node).lower()
                assert "zoo" not in text, f"{path.name}: skips on a missing zoo: {text}"
    conftest = ast.unparse(_tree(TESTS / "conftest.py"))
    assert "build_zoo(" in conftest and "skip" not in conftest


def _clock_call(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Call) and _dotted(n.func).rsplit(".", 1)[-1] in CLOCKS
               and _dotted(n.func).split(".")[0] in {"time", "perf_counter", "monotonic"}
               for n in ast.walk(node))


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_no_test_asserts_a_wall_clock_bound(path):
    tree = _tree(path)
    elapsed = set()  # names bound to a clock difference: ``dt = time.time() - t0``
    for node in ast.walk(tree):
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.BinOp)
                and isinstance(node.value.op, ast.Sub) and _clock_call(node.value)):
            elapsed |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    bad = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Assert):
            continue
        for sub in ast.walk(node.test):
            if (isinstance(sub, ast.BinOp) and isinstance(sub.op, ast.Sub)
                    and _clock_call(sub)) or (isinstance(sub, ast.Name) and sub.id in elapsed):
                bad.append(f"line {node.lineno}: {ast.unparse(node.test)}")
                break
    assert not bad, f"{path.name}: wall-clock bounds belong in benchmarks/: {bad}"
