"""The layout is a map of the design with arrows one way: no import circle among the package's modules, and the
layers keep to their side (graph_passes knows no runtime and no command line; runners never import the validator;
the validator reaches runners only through runtimes.registry)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("scr_export", "graph_passes", "runtimes", "calibration")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module of ours that ``name`` imports, at any depth of the file (function-level imports included)."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")
                up = up[:len(up) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {m: _imports(m, p, known) for m, p in mods.items()}


def test_the_walk_sees_real_imports():
    g = _graph()
    assert "scr_export.plan" in g["scr_export.reference"]          # a top-level relative import
    assert "runtimes.registry" in g["scr_export.parity"]           # a function-level absolute import
    assert "graph_passes.edges" in g["graph_passes.group_query_attention"]


def test_no_import_circle():
    g = _graph()
    # modules that import their own package __init__ are not circles of ours: drop package edges to parents
    edges = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in g.items()}
    index, low, on_stack, stack, circles = {}, {}, set(), [], []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_arrows_point_one_way():
    g = _graph()
    for m, targets in g.items():
        if m.startswith("graph_passes"):
            assert not {t for t in targets if t.startswith(("runtimes", "calibration", "scr_export.cli"))}, m
        if m.startswith("runtimes"):
            assert not {t for t in targets if t in ("scr_export.parity", "scr_export.cli")} or \
                m.endswith(".convert"), f"{m} (a runner) imports the validator or the CLI"
    # the validator sees runners only through the registry
    assert {t for t in g["scr_export.parity"] if t.startswith("runtimes")} == {"runtimes.registry"}
    assert {t for t in g["scr_export.cli"] if t.startswith("runtimes.") and t.endswith(("runner", "_runner"))} == set()
    # the server, like the CLI, reaches runners only through the registry (and shares their sampler)
    serve = {t for m, ts in g.items() if m.startswith("scr_export.serve") for t in ts if t.startswith("runtimes")}
    assert serve <= {"runtimes.registry", "runtimes.sampling"}, serve


def test_the_readme_layout_matches_the_tree():
    """Every module of the packages and benchmarks is named in the README's layout section, and every file named
    there exists."""
    import re

    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Layout")[1].split("```")[1]
    named = set(re.findall(r"\w+\.(?:py|cu|h|cc)\b", block))
    files = [p for pkg in (*PACKAGES, "benchmarks") for p in (ROOT / pkg).rglob("*")
             if p.suffix in (".py", ".cu", ".h", ".cc") and p.name != "__init__.py"]
    assert not sorted(str(p.relative_to(ROOT)) for p in files if p.name not in named), "not in the README's layout"
    present = {p.name for p in files}
    assert not sorted(n for n in named if n not in present), "named in the README's layout but absent"
