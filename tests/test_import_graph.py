"""The package's import graph is one-way: no cycle (function-level imports counted), no
upward import from ``data/``, leaves that import nothing of the package, and function-level
imports of the package only where a subcommand loads on demand."""

import ast
from pathlib import Path

import networkx as nx
import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sail_lightning"
# The function-level imports of the package allowed, by importer (None: any module), and
# why. They are left out of the cycle check: each runs only on demand.
FUNCTION_LEVEL_OK = {
    # The subcommands (serve-reward, build-models) and the name-only method check load on
    # demand: `sail-lightning fit` needs neither LitServe nor the tokenizer trainers.
    ("sail_lightning.cli", None),
    # GGUF reading needs the optional gguf package.
    ("sail_lightning.build_models", "sail_lightning.gguf"),
    # The vLLM engine module imports the optional vllm package; built on first use only.
    ("sail_lightning.engines", "sail_lightning.engines.vllm"),
    # The lazy export (PEP 562) of the DataModule: the packaged samples under data/ are read
    # by modules that the DataModule imports.
    ("sail_lightning.data", "sail_lightning.data.datamodule"),
}
LEAVES = ("sail_lightning.common", "sail_lightning.interfaces")


def allowed(importer: str, imported: str) -> bool:
    return (importer, None) in FUNCTION_LEVEL_OK or (importer, imported) in FUNCTION_LEVEL_OK


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> tuple[nx.DiGraph, list[tuple[str, str, int]]]:
    """The graph of the package's modules (an edge per import of one by another) and the
    function-level imports of package modules."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph, inner = nx.DiGraph(), []  # graph: module-level and not-allowed inner imports
    graph.add_nodes_from(files)
    for name, path in files.items():
        tree = ast.parse(path.read_text())
        top = {id(n) for stmt in tree.body for n in (
            ast.walk(stmt) if isinstance(stmt, ast.If | ast.Try) else [stmt])}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            for target in (t for t in targets if t in files and t != name):
                if id(node) in top:
                    graph.add_edge(name, target)
                    continue
                inner.append((name, target, node.lineno))
                if not allowed(name, target):
                    graph.add_edge(name, target)
    return graph, inner


GRAPH, INNER = imports()


def test_the_graph_is_read_whole():
    assert GRAPH.number_of_nodes() > 40
    assert GRAPH.has_edge("sail_lightning.rounds", "sail_lightning.pair_modes")


def test_no_import_cycle():
    cycles = list(nx.simple_cycles(GRAPH))
    assert cycles == [], f"import cycles: {cycles}"


def test_data_imports_neither_labellers_nor_objectives():
    upward = [(a, b) for a, b in GRAPH.edges if a.startswith("sail_lightning.data")
              and b.startswith(("sail_lightning.labellers", "sail_lightning.objectives"))]
    assert upward == []


@pytest.mark.parametrize("leaf", LEAVES)
def test_the_leaves_import_nothing_of_the_package(leaf):
    assert list(GRAPH.successors(leaf)) == []


def test_package_modules_are_imported_at_module_level():
    hidden = [x for x in INNER if not allowed(x[0], x[1])]
    assert hidden == [], f"function-level imports of the package: {hidden}"


def test_a_cycle_would_be_found():
    graph = GRAPH.copy()
    graph.add_edge("sail_lightning.common", "sail_lightning.objectives")
    assert list(nx.simple_cycles(graph))


@pytest.mark.parametrize("names", [("DTYPES", "_DTYPES"), ("PATH_STARTS", "_PATH_STARTS"),
                                   ("BAD_RECORD_MODES", "_BAD_RECORD_MODES")])
def test_shared_constants_are_defined_once(names):
    where = [module_name(p) for p in PACKAGE.rglob("*.py")
             for node in ast.parse(p.read_text()).body if isinstance(node, ast.Assign)
             for t in node.targets if isinstance(t, ast.Name) and t.id in names]
    assert len(where) == 1, where
