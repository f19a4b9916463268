"""The suite's own rules, read from the test files' syntax trees (no test is run):

- ``slow`` is honest: a test is marked slow exactly when it builds a zoo (the
  ``small_zoo``/``zoo_sources`` fixtures, ``build_zoo``), starts Ray (``ray.init``,
  ``run_search``, a ``npstune search``/``ray`` subprocess) or downloads; so
  ``bash scripts/test.sh -m "not slow"`` is the fast loop and runs everything else.
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
ZOO_FIXTURES = {"small_zoo", "zoo_sources", "llm_zoo_sources"}
# Called for real (not replaced with monkeypatch.setattr), these build a zoo or search.
# Downloads happen only in conftest's zoo_sources fixture (fetch_sources elsewhere is
# handed a corrupt archive or a failing pip, and never downloads).
HEAVY_CALLS = {"run_search", "build_zoo", "build_llm_zoo"}
#: calls that start Ray, looked for in module-level script strings (``python -c``)
RAY_STARTERS = ("ray.init(", "connect_ray(")
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
    return any(
        _dotted(d.func if isinstance(d, ast.Call) else d).endswith("fixture")
        for d in fn.decorator_list
    )


def _marks(decorators: list[ast.expr]) -> set[str]:
    out = set()
    for d in decorators:
        name = _dotted(d.func if isinstance(d, ast.Call) else d)
        if name.startswith("pytest.mark."):
            out.add(name.removeprefix("pytest.mark."))
    return out


def _module_marks(tree: ast.Module) -> set[str]:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets
        ):
            vals = (
                node.value.elts
                if isinstance(node.value, (ast.List, ast.Tuple))
                else [node.value]
            )
            return _marks(vals)
    return set()


def _heavy_body(
    fn: ast.FunctionDef, mocked: set[str], helpers: dict[str, str] | None = None
) -> str | None:
    """Why ``fn``'s own body is slow (a real zoo build, Ray, a search subprocess, or
    a call to a module helper in ``helpers`` that does one of them)."""
    for node in ast.walk(fn):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        last = name.rsplit(".", 1)[-1]
        if name == "ray.init":
            return "ray.init"
        if helpers and name in helpers:
            return f"{name} ({helpers[name]})"
        if last in HEAVY_CALLS and last not in mocked:
            return last
        if last in {"run", "Popen", "check_call", "check_output", "call"} and node.args:
            first = node.args[0]
            if isinstance(first, (ast.List, ast.Tuple)):
                for e in first.elts:  # python -c SCRIPT, SCRIPT a Ray-starting constant
                    if isinstance(e, ast.Name) and helpers and e.id in helpers:
                        return f"a subprocess running {e.id} ({helpers[e.id]})"
                words = [e.value for e in first.elts if isinstance(e, ast.Constant)]
                if "search" in words or (
                    "start" in words
                    and any("ray" in ast.unparse(e) for e in first.elts)
                ):
                    return "a search/ray subprocess"
    return None


def _mocked(fn: ast.FunctionDef) -> set[str]:
    """Names a test replaces with ``monkeypatch.setattr(obj, "name", ...)`` (then a
    call to it is no real build or search)."""
    return {
        node.args[1].value
        for node in ast.walk(fn)
        if isinstance(node, ast.Call)
        and _dotted(node.func).endswith("setattr")
        and len(node.args) >= 2
        and isinstance(node.args[1], ast.Constant)
    }


def _slow_reasons(tree: ast.Module) -> dict[str, str | None]:
    """test name -> why it is slow (None: it is not)."""
    fns = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    fixtures = {f.name: f for f in fns if _is_fixture(f)}
    heavy_fix: dict[str, str] = {n: "fixture " + n for n in ZOO_FIXTURES}
    # module helpers (neither fixtures nor tests) that are heavy, transitively
    plain = {f.name: f for f in fns if f.name not in fixtures}
    plain = {n: f for n, f in plain.items() if not n.startswith("test_")}
    helpers: dict[str, str] = {
        target.id: "a script that starts Ray"
        for node in tree.body
        if isinstance(node, ast.Assign)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
        and any(call in node.value.value for call in RAY_STARTERS)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    changed = True
    while changed:
        changed = False
        for name, f in plain.items():
            if name not in helpers:
                why = _heavy_body(f, _mocked(f), helpers)
                if why:
                    helpers[name] = why
                    changed = True
    changed = True
    while changed:  # fixtures that start Ray or use a heavy fixture are heavy too
        changed = False
        for name, f in fixtures.items():
            if name in heavy_fix:
                continue
            why = _heavy_body(f, _mocked(f), helpers) or next(
                (heavy_fix[a.arg] for a in f.args.args if a.arg in heavy_fix), None
            )
            if why:
                heavy_fix[name] = f"fixture {name} ({why})"
                changed = True
    out = {}
    for f in fns:
        if f.name.startswith("test_"):
            out[f.name] = next(
                (heavy_fix[a.arg] for a in f.args.args if a.arg in heavy_fix), None
            ) or _heavy_body(f, _mocked(f), helpers)
    return out


def _tests_and_marks(tree: ast.Module) -> dict[str, set[str]]:
    mod = _module_marks(tree)
    return {
        f.name: _marks(f.decorator_list) | mod
        for f in tree.body
        if isinstance(f, ast.FunctionDef) and f.name.startswith("test_")
    }


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_slow_marks_are_exactly_the_zoo_ray_and_download_tests(path):
    tree = _tree(path)
    reasons, marks = _slow_reasons(tree), _tests_and_marks(tree)
    unmarked = {t: r for t, r in reasons.items() if r and "slow" not in marks[t]}
    overmarked = [t for t, r in reasons.items() if not r and "slow" in marks[t]]
    assert not unmarked, f"{path.name}: mark these slow (why): {unmarked}"
    assert not overmarked, (
        f"{path.name}: marked slow but build no zoo and start no Ray: "
        f"{overmarked} (make them fast, or say in _heavy_body why)"
    )


def test_the_zoo_comes_from_conftest_and_never_skips():
    for path in FILES:
        tree = _tree(path)
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and _is_fixture(node):
                assert node.name not in ZOO_FIXTURES, (
                    f"{path.name} defines its own {node.name} fixture: use conftest's "
                    "(it builds or reuses the zoo)"
                )
            if isinstance(node, ast.Call) and _dotted(node.func) == "pytest.skip":
                text = ast.unparse(node).lower()
                assert "zoo" not in text, f"{path.name}: skips on a missing zoo: {text}"
    conftest = ast.unparse(_tree(TESTS / "conftest.py"))
    assert "build_zoo(" in conftest and "skip" not in conftest


def _clock_call(node: ast.AST) -> bool:
    return any(
        isinstance(n, ast.Call)
        and _dotted(n.func).rsplit(".", 1)[-1] in CLOCKS
        and _dotted(n.func).split(".")[0] in {"time", "perf_counter", "monotonic"}
        for n in ast.walk(node)
    )


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_no_test_asserts_a_wall_clock_bound(path):
    tree = _tree(path)
    elapsed = set()  # names bound to a clock difference: ``dt = time.time() - t0``
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.BinOp)
            and isinstance(node.value.op, ast.Sub)
            and _clock_call(node.value)
        ):
            elapsed |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    bad = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Assert):
            continue
        for sub in ast.walk(node.test):
            if (
                isinstance(sub, ast.BinOp)
                and isinstance(sub.op, ast.Sub)
                and _clock_call(sub)
            ) or (isinstance(sub, ast.Name) and sub.id in elapsed):
                bad.append(f"line {node.lineno}: {ast.unparse(node.test)}")
                break
    assert not bad, f"{path.name}: wall-clock bounds belong in benchmarks/: {bad}"


def test_a_subprocess_script_that_starts_ray_is_heavy():
    """``python -c SCRIPT`` with a module-level SCRIPT that starts Ray makes a test
    slow; the same call with a script that does not, or a test that does neither, is
    not."""
    src = '''
RAY = """
from npstune.search.runner import connect_ray
connect_ray()
"""
PLAIN = "print(1)"

def test_ray(tmp_path):
    subprocess.run([sys.executable, "-c", RAY])

def test_plain():
    subprocess.run([sys.executable, "-c", PLAIN])

def test_nothing():
    assert True
'''
    reasons = _slow_reasons(ast.parse(src))
    assert reasons == {
        "test_ray": "a subprocess running RAY (a script that starts Ray)",
        "test_plain": None,
        "test_nothing": None,
    }
