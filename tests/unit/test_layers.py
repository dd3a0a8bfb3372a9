"""Layers point down, read from the import graph of the source tree (every import, function-level ones included).

From the bottom: the stubs (`moemesh.v1`), the shared packages (`moemesh.<pkg>`, shared/), the services
(`moemesh.services.<name>`, each on its own: services talk gRPC, never import each other), the benchmarks
(`moemesh.bench`), and the command line (`moemesh.services.cli`), which may import all of them. Shared code never
imports a service, a benchmark or the command line; the shared packages import each other without a cycle, and
no module takes part in an import cycle.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from collections.abc import Collection, Iterator
from pathlib import Path

from tests.paths import ROOT

# folder -> the import name it installs as (pyproject.toml's [tool.setuptools.package-dir])
ROOTS = {"shared": "moemesh", "services": "moemesh.services", "bench": "moemesh.bench"}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, prefix in ROOTS.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder)
            if rel.parts[0] == "rpc" or (folder == "shared" and rel.parts[0] in ("services", "bench")):
                continue  # generated stubs: protoc's output, importing only each other
            parts = rel.with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((prefix, *parts))] = path
    return out


def _imports(module: str, path: Path, known: Collection[str]) -> Iterator[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            # `from pkg import module` imports the module; `from module import name`, the module.
            subs = [f"{base}.{a.name}" for a in node.names]
            yield from subs if any(s in known for s in subs) else [base]


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        graph[name] = {i for i in _imports(name, path, modules) if i in modules and i != name}
    return graph


def layer_of(module: str) -> str:
    """`v1`, `shared:<pkg>`, `service:<name>`, `bench` or `cli`."""
    parts = module.split(".")
    if parts[:2] == ["moemesh", "services"]:
        return "cli" if parts[2:3] == ["cli"] else f"service:{parts[2]}" if len(parts) > 2 else "service:"
    if parts[:2] == ["moemesh", "bench"]:
        return "bench"
    return f"shared:{parts[1] if len(parts) > 1 else ''}"


def test_the_graph_is_read() -> None:
    graph = _graph()
    assert "moemesh.engine.engine" in graph["moemesh.worker.runtime"]  # a top-level import
    assert "moemesh.ep.group" in graph["moemesh.worker.ep_args"]  # a function-level one
    assert len(graph) > 150


def test_shared_code_imports_no_service_benchmark_or_command_line() -> None:
    bad = [(m, i) for m, deps in _graph().items() if layer_of(m).startswith("shared:")
           for i in deps if not layer_of(i).startswith("shared:")]
    assert not bad, bad


def test_services_do_not_import_each_other_and_only_the_command_line_imports_benchmarks() -> None:
    bad = []
    for m, deps in _graph().items():
        lm = layer_of(m)
        for i in deps:
            li = layer_of(i)
            if lm.startswith("service:") and li != lm and not li.startswith("shared:"):
                bad.append((m, i))
            if lm == "bench" and li == "cli":
                bad.append((m, i))
    assert not bad, bad


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_module_is_part_of_an_import_cycle() -> None:
    assert _cycles(_graph()) == []


def test_the_shared_packages_import_each_other_without_a_cycle() -> None:
    packages: dict[str, set[str]] = defaultdict(set)
    for m, deps in _graph().items():
        if layer_of(m).startswith("shared:"):
            packages[layer_of(m)] |= {layer_of(i) for i in deps if layer_of(i) != layer_of(m)}
    assert _cycles(packages) == []


def test_the_cycle_finder_finds_cycles() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
