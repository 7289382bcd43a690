"""The package's imports flow one way (docs/contracts.md, "Layers"): read from the source with ast,
nothing is imported or run. A module may import modules of its own layer and of layers below it;
the two loops (training, downstream) and the two readers (analysis, reporting) do not import
each other, and the readers do not import the workflow; nothing in src/
imports Snakemake or DVC; and there is no import cycle."""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

#: Lowest first. A module belongs to the first layer with a matching name (``x`` matches ``x`` and
#: ``x.*``); ``*.commands`` modules, the argparse front of each area, are the command line.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("mpvg", "mpvg.runinfo", "mpvg.run.layout")),
    ("settings", ("mpvg.config",)),
    ("models", ("mpvg.models",)),
    ("data", ("mpvg.data",)),
    ("records", ("mpvg.signature", "mpvg.tracking")),
    ("run layer", ("mpvg.run",)),
    ("loops", ("mpvg.training", "mpvg.downstream")),
    ("results", ("mpvg.results",)),
    ("readers", ("mpvg.analysis", "mpvg.reporting")),
    ("workflow", ("mpvg.workflow",)),
    ("command line", ("mpvg.cli", "mpvg.__main__")),
]
#: Packages of one layer that must not import each other: the two loops share only the run layer;
#: the two readers share only what lies below them (mpvg.results: result files, paper numbers, rendering).
SIBLINGS = (("mpvg.training", "mpvg.downstream"), ("mpvg.analysis", "mpvg.reporting"))
FORBIDDEN = ("snakemake", "dvc")  # nothing in src/ imports the workflow tools (they call us)

#: Edges still to be removed, each named with who removes it. Any other upward, sibling or cyclic
#: import fails this test; an edge listed here must still be in the code. None remains.
PENDING: dict[tuple[str, str], str] = {}


def modules() -> dict[str, Path]:
    found = {}
    for path in (SRC / "mpvg").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: dict) -> set[str]:
    """Every module ``name`` imports (at the top or inside a function: both are dependencies)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # `from mpvg.run import distributed` imports mpvg.run.distributed
                out.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target)
    return out


def layer_of(module: str) -> int:
    if module.rpartition(".")[2] == "commands":
        return len(LAYERS) - 1
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(module == p for p in prefixes):
            return index
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(module.startswith(p + ".") for p in prefixes if p != "mpvg"):
            return index
    raise AssertionError(f"{module} is in no layer of tests/test_layers.py: add it to LAYERS")


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {m for m in imports(name, path, known) if m in known and m != name}
            for name, path in known.items()}


def sibling(module: str) -> str | None:
    if module.rpartition(".")[2] == "commands":  # the command line may use any area
        return None
    return next((p for group in SIBLINGS for p in group if module == p or module.startswith(p + ".")), None)


def test_every_module_has_a_layer_and_imports_only_down():
    bad = []
    for module, deps in graph().items():
        for dep in deps:
            if (module, dep) in PENDING:
                continue
            upward = layer_of(dep) > layer_of(module)
            cross = sibling(module) and sibling(dep) and sibling(module) != sibling(dep) \
                and layer_of(module) == layer_of(dep)
            if upward or cross:
                bad.append(f"{module} ({LAYERS[layer_of(module)][0]}) imports {dep} ({LAYERS[layer_of(dep)][0]})")
    assert not bad, "imports against the layer order:\n" + "\n".join(sorted(bad))


def test_every_pending_edge_is_still_in_the_code():
    """PENDING lists known debts, not permissions: an edge that is gone must leave the list."""
    g = graph()
    gone = [edge for edge in PENDING if edge[1] not in g.get(edge[0], set())]
    assert not gone, f"no longer imported, remove from PENDING: {gone}"


def test_no_import_cycle():
    edges = {m: {d for d in deps if (m, d) not in PENDING} for m, deps in graph().items()}
    # a package's __init__ importing its own modules is how Python packages work: not a cycle
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(edges[node]):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_nothing_imports_the_workflow_tools():
    known = modules()
    bad = sorted(f"{name} imports {dep}" for name, path in known.items() for dep in imports(name, path, known)
                 if dep.split(".")[0] in FORBIDDEN)
    assert not bad, bad


def test_the_rules_catch_what_they_should():
    """The checker itself: an upward import, a sibling import and a cycle are each found."""
    assert layer_of("mpvg.run.folder") < layer_of("mpvg.training.engine") < layer_of("mpvg.workflow.plan")
    assert layer_of("mpvg.run.layout") == 0 and layer_of("mpvg.data.commands") == len(LAYERS) - 1
    assert sibling("mpvg.analysis.extract") == "mpvg.analysis" != sibling("mpvg.reporting.tables")
    assert layer_of("mpvg.results.render") < layer_of("mpvg.analysis.analyze") == layer_of("mpvg.reporting.report")
    assert sibling("mpvg.downstream.engine") == "mpvg.downstream" != sibling("mpvg.training.engine")
    known = modules()
    assert "mpvg.run.distributed" in imports("mpvg.downstream.segmentation", known["mpvg.downstream.segmentation"],
                                             known)
