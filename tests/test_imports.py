"""The package structure, read with `ast`: who may import whom, no import cycle, each package imports alone,
and the server reaches the engine only through AsyncEngine."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["atv_core.engine", "atv_core.steering", "atv_core.tools", "server"]
ENGINE_INTERNALS = {"atv_core.engine.runner", "atv_core.engine.scheduler"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def our_modules() -> dict[str, Path]:
    files = [*ROOT.joinpath("atv_core").rglob("*.py"), *ROOT.joinpath("server").rglob("*.py")]
    return {module_name(path): path for path in files}


def imports(name: str, path: Path) -> set[str]:
    """Every module of ours that `name` imports, at any depth of its code (lazy imports included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    modules = our_modules()
    return {m for m in found if m in modules and m != name}


def test_only_the_engine_package_imports_the_runner_and_the_scheduler():
    offenders = {name: sorted(imports(name, path) & ENGINE_INTERNALS) for name, path in our_modules().items()
                 if not name.startswith("atv_core.engine")}
    assert not {k: v for k, v in offenders.items() if v}, offenders


def test_no_import_cycle():
    graph = {name: imports(name, path) for name, path in our_modules().items()}
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt in path:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in done:
                visit(nxt, path + [nxt])
        done.add(node)

    for name in sorted(graph):
        visit(name, [name])
    assert graph["server.app"] and graph["atv_core.engine.async_engine"]   # the graph is not trivially empty


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_imports_alone(package):
    names = sorted(n for n in our_modules() if n == package or n.startswith(package + "."))
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    done = subprocess.run([sys.executable, "-c", code, *names], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(names) >= 2


def test_the_server_touches_no_engine_internals():
    """server/ talks to AsyncEngine's public API: no `.engine.engine`, runner, scheduler, tokenizer, private names."""
    internal = {"runner", "scheduler", "tokenizer", "eos_ids", "step_listeners"}
    found = []
    for path in ROOT.joinpath("server").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Attribute):
                continue
            on_engine = isinstance(node.value, ast.Attribute) and node.value.attr == "engine" or \
                isinstance(node.value, ast.Name) and node.value.id in ("engine", "async_engine")
            if node.attr in internal or (on_engine and (node.attr == "engine" or node.attr.startswith("_"))):
                found.append(f"{path.name}:{node.lineno} .{node.attr}")
    assert not found, found
