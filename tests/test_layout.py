"""The code's shape, as DESIGN.md sets it: no import cycle among `st` modules (imports inside
functions count), no module over 400 lines, no CLI command over ~35 lines, and no module importing
another module's `_private` names."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = {
    ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
    for folder in ("st", "cli")
    for p in sorted((ROOT / folder).rglob("*.py"))
}


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every import in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [alias.name for alias in node.names]
            # `from st import dist` imports the module st.dist
            found += [
                (f"{node.module}.{n}", []) if f"{node.module}.{n}" in MODULES else (node.module, [n]) for n in names
            ]
    return found


def graph() -> dict[str, set[str]]:
    edges = {}
    for name, path in MODULES.items():
        if name.startswith("st"):
            targets = {module for module, _ in imports(path)}
            # a package's __init__ runs on any import below it: count `st.models.bert` as `st.models` too
            edges[name] = {
                m
                for m in MODULES
                if m.startswith("st") and m != name and any(t == m or t.startswith(m + ".") for t in targets)
            }
    return edges


def test_no_import_cycle_among_st_modules():
    edges, state, cycles = graph(), {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open" and not (
                nxt == "st" or node.startswith(nxt + ".")
            ):  # a package and its own modules
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, f"import cycles: {cycles}"


def test_the_import_graph_is_seen():  # the cycle test means something only if edges are found
    edges = graph()
    assert (
        "st.train" in edges["st.share_run"]
        and "st.pipeline" in edges["st.share_run"]
        and "st.select" in edges["st.report"]
    )


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_small(name):
    assert len(MODULES[name].read_text().splitlines()) <= 400


def test_cli_commands_are_thin():
    trees = [ast.parse(path.read_text()) for path in sorted((ROOT / "cli").glob("*.py"))]
    commands = [
        f for tree in trees for f in tree.body if isinstance(f, ast.FunctionDef) and f.name.endswith("_command")
    ]
    assert len(commands) >= 10
    for f in commands:
        body = f.end_lineno - f.body[0].lineno + 1  # the function's lines, past its decorators and signature
        assert body <= 35, f"{f.name} is {body} lines"


def test_no_module_imports_private_names_of_another():
    private = [
        (name, module, n)
        for name, path in MODULES.items()
        for module, names in imports(path)
        for n in names
        if n.startswith("_") and module != name and not n.startswith("__")
    ]
    assert not private, private


def _tool(name: str) -> str:
    """A console script of the interpreter running the tests (the venv's ruff and vermin)."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


@pytest.mark.parametrize("command", [["format", "--check"], ["check"]])
def test_ruff_is_clean(command):
    """Formatted and linted as pyproject.toml's [tool.ruff] says (the module cap above holds after formatting)."""
    result = subprocess.run([_tool("ruff"), *command, "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_python_floor_in_pyproject_is_true():
    """requires-python says 3.10: vermin finds no stdlib call or syntax that needs a later Python."""
    assert re.search(r'^requires-python = ">=3.10"', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    folders = [str(ROOT / f) for f in ("st", "cli", "tests", "bench")]
    result = subprocess.run(
        [_tool("vermin"), "-t=3.10-", "--no-tips", "--violations", "--eval-annotations", *folders],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
