"""The layout shows the pipeline: tunelab's modules import each other in no circle, and imports only
point down the layers (entrypoint and commands; pipeline and experiment management; stages; config
validation, which asks the libraries what they accept; libraries; config: schema, discovery, identity). Same graph as /work/shared/tools/import_cycles.py: every `import` and
`from ... import` (at any depth, lazy ones included) of a tunelab module."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "tunelab"

# Highest first. A module's layer is that of its longest matching prefix.
LAYERS = [
    ("entrypoint and commands", ("tunelab.cli", "tunelab.__main__", "tunelab.commands")),
    ("pipeline and experiment management", ("tunelab.pipeline", "tunelab.sweep", "tunelab.sweep_tracking",
                                            "tunelab.sweep_results", "tunelab.tracking", "tunelab.cache",
                                            "tunelab.rundir")),
    ("stages", ("tunelab.stages",)),
    # The cross-field rules ask the libraries what they accept (readers, metrics, template policies).
    ("config validation", ("tunelab.config.checks",)),
    ("libraries", ("tunelab.data", "tunelab.templates", "tunelab.models", "tunelab.export", "tunelab.eval",
                   "tunelab.training", "tunelab.serving", "tunelab.records", "tunelab.paths", "tunelab.plots",
                   "tunelab.procs", "tunelab.provenance", "tunelab.llama_process",
                   "tunelab.runstate")),  # signals and process identities, used by stages.train too
    ("config", ("tunelab.config",)),
]


def modules(root: Path = PACKAGE) -> dict:
    return {".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in root.rglob("*.py")}


def _imported(node, base: str):
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        mod = node.module or ""
        if node.level:
            parts = base.split(".")
            mod = ".".join(parts[: len(parts) - node.level + 1] + ([mod] if mod else []))
        return [mod] + [f"{mod}.{a.name}" for a in node.names]
    return []


def import_graph(root: Path = PACKAGE) -> dict:
    """module -> the tunelab modules it imports."""
    mods = modules(root)
    edges = {m: set() for m in mods}
    for m, path in mods.items():
        base = m if path.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            for name in _imported(node, base):
                while name and name not in mods:
                    name = name.rsplit(".", 1)[0] if "." in name else ""
                if name and name != m and name != root.name:
                    edges[m].add(name)
    return edges


def circles(edges: dict) -> list:
    """Strongly connected groups of 2+ modules (Tarjan, iterative)."""
    index, low, on, stack, found, counter = {}, {}, set(), [], [], [0]

    def visit(root):
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter[0]; counter[0] += 1; stack.append(root); on.add(root)
        while work:
            v, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]; counter[0] += 1; stack.append(child); on.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on:
                    low[v] = min(low[v], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                group = []
                while True:
                    w = stack.pop(); on.discard(w); group.append(w)
                    if w == v:
                        break
                if len(group) > 1:
                    found.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def layer(module: str) -> int:
    """0 for the top layer; the longest prefix decides (tunelab.sweep_results is not tunelab.sweep)."""
    best = (-1, None)
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best[0]:
                best = (len(prefix), rank)
    return best[1]


def test_the_checker_finds_a_circle_when_there_is_one(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from pkg import b\n")
    (pkg / "b.py").write_text("from pkg.a import f\n")
    (pkg / "c.py").write_text("from . import a\n")
    assert circles(import_graph(pkg)) == [["pkg.a", "pkg.b"]]


def test_no_module_of_tunelab_imports_itself_in_a_circle():
    assert circles(import_graph()) == []


def test_every_module_has_a_layer():
    assert [m for m in modules() if m != "tunelab" and layer(m) is None] == []


def test_imports_point_down_the_layers():
    upward = [f"{m} ({LAYERS[layer(m)][0]}) imports {n} ({LAYERS[layer(n)][0]})"
              for m, targets in import_graph().items() if m != "tunelab" for n in sorted(targets)
              if layer(n) < layer(m)]
    assert upward == []


@pytest.mark.parametrize("module", ["tunelab.tracking", "tunelab.cli", "tunelab.pipeline"])
def test_modules_stay_small(module):
    path = modules()[module]
    assert len(path.read_text().splitlines()) < 300, path
