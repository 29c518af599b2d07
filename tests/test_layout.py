"""The house rules a newcomer relies on: imports run one way (kernels <- actors <- cluster), benches are imported
by nothing but the CLI, and no module grows past ~500 lines without saying why in its docstring."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOMS = ("kernels", "actors", "cluster")  # lower first
MAX_LINES = 520  # "~500": a module over this must say why in its docstring ("Longer than ~500 lines: ...")


def modules(room: str) -> list[Path]:
    return sorted(p for p in (REPO / room).rglob("*.py") if "__pycache__" not in p.parts)


def onspec_imports(path: Path) -> list[tuple[int, str]]:
    """Every onspec module a file imports, at any depth (function-level imports count: they run too)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("onspec.")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("onspec"):
            out += [(node.lineno, node.module + ("." + a.name if node.module == "onspec" else ""))
                    for a in node.names]
    return out


@pytest.mark.parametrize("room", ROOMS[:2])
def test_imports_never_run_back_up(room):
    above = ROOMS[ROOMS.index(room) + 1:]
    bad = [f"{p.relative_to(REPO)}:{line} imports {mod}" for p in modules(room)
           for line, mod in onspec_imports(p) if mod.split(".")[1] in above]
    assert not bad, "imports must go kernels <- actors <- cluster:\n" + "\n".join(bad)


def test_nothing_but_the_cli_and_benches_imports_a_bench():
    bad = [f"{p.relative_to(REPO)}:{line} imports {mod}" for room in ROOMS for p in modules(room)
           if "bench" not in p.parts and p.name != "cli.py"
           for line, mod in onspec_imports(p) if mod.startswith("onspec.cluster.bench")]
    assert not bad, "\n".join(bad)


def test_the_check_sees_a_backward_import(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from onspec.cluster.serve import Cluster\n")
    assert onspec_imports(f) == [(2, "onspec.cluster.serve")]


def test_long_modules_say_why():
    bad = []
    for room in ROOMS:
        for p in modules(room):
            n = len(p.read_text().splitlines())
            doc = ast.get_docstring(ast.parse(p.read_text())) or ""
            if n > MAX_LINES and "Longer than ~500 lines" not in doc:
                bad.append(f"{p.relative_to(REPO)}: {n} lines")
    assert not bad, "split these, or say in the docstring why not ('Longer than ~500 lines: ...'):\n" + "\n".join(bad)
