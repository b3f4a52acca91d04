"""What the installed package ships besides its code: py.typed and the compiled module's type stub.

The stub (python/fastadam/_core.pyi) is written by hand, so it is held to
the compiled module here: the same functions and classes, each with the
parameters pybind11 reports (their names where the bindings name them;
otherwise their count, positional-only).  A change to csrc/module.cpp that
the stub does not follow fails this test.
"""

from __future__ import annotations

import ast
import importlib.resources
import importlib.util
import re
import subprocess
import sys
import textwrap

import pytest

from fastadam import _core

PACKAGE = importlib.resources.files("fastadam")


def stub_tree() -> ast.Module:
    return ast.parse((PACKAGE / "_core.pyi").read_text())


def public(names) -> set[str]:
    return {n for n in names if not n.startswith("_")}


def stub_parameters(function: ast.FunctionDef) -> tuple[list[str], bool]:
    """The parameter names (without self), and whether they are all positional-only."""
    a = function.args
    names = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs if p.arg != "self"]
    keywords_allowed = [p for p in a.args + a.kwonlyargs if p.arg != "self"]
    return names, not keywords_allowed


def bound_parameters(obj) -> list[str]:
    """The parameter names in pybind11's signature line, e.g. ``f(arg0: object, name: str) -> None``."""
    line = obj.__doc__.splitlines()[0]
    inside = line[line.index("(") + 1:line.rindex(") ->")]
    names, depth, current = [], 0, ""
    for ch in inside + ",":
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            if current.strip():
                names.append(current.split(":")[0].strip())
            current = ""
        else:
            current += ch
    return [n for n in names if n != "self"]


def assert_signature_matches(where: str, stub: ast.FunctionDef, bound) -> None:
    names, positional_only = stub_parameters(stub)
    expected = bound_parameters(bound)
    assert len(names) == len(expected), f"{where}: the stub has {len(names)} parameters, _core {len(expected)}"
    if all(re.fullmatch(r"arg\d+", n) for n in expected):
        assert positional_only, f"{where}: _core takes no keywords here; the stub must mark its parameters '/'"
    else:
        assert names == expected, where


def test_the_package_ships_py_typed_and_the_stub_beside_the_compiled_module():
    assert (PACKAGE / "py.typed").is_file()
    assert (PACKAGE / "_core.pyi").is_file()
    assert any(p.name.startswith("_core.") and p.name.endswith(".so") for p in PACKAGE.iterdir())


def test_the_stub_names_exactly_what_the_compiled_module_exports():
    tree = stub_tree()
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    constants = {n.target.id: n for n in tree.body if isinstance(n, ast.AnnAssign)}
    exported = public(vars(_core))
    assert public(functions) | public(classes) | public(constants) == exported
    for name in constants:
        assert not callable(getattr(_core, name)), f"{name} is declared a constant, but _core's is callable"
    for name, stub in functions.items():
        assert_signature_matches(name, stub, getattr(_core, name))
    for name, stub in classes.items():
        cls = getattr(_core, name)
        members = {n.name: n for n in stub.body if isinstance(n, ast.FunctionDef)}
        assert public(members) == public(vars(cls)) - {"_pybind11_conduit_v1_"}, name
        assert ("__len__" in members) == hasattr(cls, "__len__"), name
        for method in ("__init__", *public(m for m in members if not isinstance(getattr(cls, m), property))):
            assert_signature_matches(f"{name}.{method}", members[method], getattr(cls, method))


EXAMPLE = """
    import numpy as np
    import fastadam
    from fastadam import _core

    p, g, m, v = (np.zeros(8, np.float32) for _ in range(4))
    applied: bool = fastadam.adam_step(p, g, m, v, step=1)
    threads: int = _core.get_num_threads()
    isa: str = fastadam.config()["isa"]
    _core.probe_step(p, g, m, v, exact=True)
    wrong: str = _core.get_num_threads()
"""


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy is not installed")
def test_mypy_sees_the_api_through_the_stub(tmp_path):
    example = tmp_path / "example.py"
    example.write_text(textwrap.dedent(EXAMPLE))
    result = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", "--cache-dir", str(tmp_path / "c"),
                             "--python-executable", sys.executable, str(example)],
                            capture_output=True, text=True, timeout=300)
    # Exactly one error: the deliberate one on the last line (an int is no str).  Without the
    # stub, mypy would see _core as untyped (or missing) and report something else or nothing.
    errors = [line for line in result.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 1 and "example.py:11:" in errors[0] and '"int"' in errors[0], result.stdout

