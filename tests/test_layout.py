"""The layout ARCHITECTURE.md promises: no import cycles, a small flat core, plain functions at the top level,
and wings that import only downwards."""
from __future__ import annotations

import ast
import subprocess
import sys
import types
from pathlib import Path

import pytest

import wmdeploy

ROOT = Path(__file__).resolve().parent.parent
# source folder -> the package it installs as (pyproject's package-dir)
PACKAGES = {ROOT / "wmdeploy": "wmdeploy", ROOT / "runtimes": "wmdeploy.runtimes", ROOT / "models": "wmdeploy.models"}


def _modules() -> dict[str, tuple[Path, bool]]:
    """Every module of the three source trees: dotted name -> (file, is a package __init__)."""
    found: dict[str, tuple[Path, bool]] = {}
    for folder, package in PACKAGES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [package, *rel.parts]
            is_pkg = parts[-1] == "__init__"
            if is_pkg:
                parts = parts[:-1]
            found[".".join(parts)] = (path, is_pkg)
    return found


def _in_type_checking(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def _imports(name: str, path: Path, is_pkg: bool, known: set[str]) -> set[str]:
    """Modules of ours that ``name`` imports anywhere (module level, inside functions, and under
    ``if TYPE_CHECKING:``: a type-only import is still an arrow a type checker, an IDE or a later refactor
    follows), resolved to modules: ``from . import x`` counts as importing the submodule x when it is one,
    else the package itself. One exception: the top-level package's ``TYPE_CHECKING`` block mirrors its lazy
    API (``_LAZY``: nothing is imported until first use, after the package is complete), and submodules
    import the package for ``__version__``; that mirror is for IDEs, not an arrow."""
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = name if is_pkg else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if name == "wmdeploy" and _in_type_checking(node, parents):
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {name: _imports(name, path, is_pkg, known) for name, (path, is_pkg) in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
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

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph = _graph()
    assert len(graph) > 60  # the walk found the whole tree, not an empty folder
    assert _cycles(graph) == []


def test_the_cycle_finder_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_type_only_imports_count(tmp_path: Path):
    mod = tmp_path / "m.py"
    mod.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from wmdeploy.errors import InputError\n")
    assert _imports("wmdeploy.m", mod, False, {"wmdeploy", "wmdeploy.errors", "wmdeploy.m"}) == {"wmdeploy.errors"}
    # the circle the issue named: profiling.table took ProfileReport (type only) from runner -> report -> table
    graph = _graph()
    assert not {t for t in graph["wmdeploy.profiling.table"] if t.startswith("wmdeploy.profiling.")}


def test_the_flat_core_stays_small_and_modules_stay_short():
    flat = sorted(p.name for p in (ROOT / "wmdeploy").glob("*.py"))
    assert len(flat) <= 18, flat
    long = {str(p.relative_to(ROOT)): n for folder in PACKAGES for p in folder.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 420}
    assert long == {}


def test_wings_import_only_downwards():
    """The runtime path never imports a wing, the transform/profiling wings never import the CLI or the
    server, and nothing but the CLI imports the CLI."""
    graph = _graph()
    runtime_path = [m for m in graph if m in ("wmdeploy.contract", "wmdeploy.streaming", "wmdeploy.snapshot",
                                              "wmdeploy.errors") or m.startswith(("wmdeploy.runtimes",
                                                                                   "wmdeploy.serve", "wmdeploy.pooling"))]
    for m in runtime_path:
        bad = {t for t in graph[m] if t.startswith(("wmdeploy.transform", "wmdeploy.profiling", "wmdeploy.cli",
                                                   "wmdeploy.exporter", "wmdeploy.torch_module", "wmdeploy.hf"))}
        assert not bad, f"{m} imports {bad}"
    for m, targets in graph.items():
        if not m.startswith(("wmdeploy.cli", "wmdeploy.__main__")):
            assert not {t for t in targets if t.startswith("wmdeploy.cli")}, m
        if m.startswith(("wmdeploy.transform", "wmdeploy.profiling", "wmdeploy.hf")):
            assert not {t for t in targets if t.startswith("wmdeploy.serve")}, m
        if m.startswith("wmdeploy.text"):  # the tokenizer side of the runtime: torch-free, never the export wing
            assert not {t for t in targets if t.startswith(("wmdeploy.hf", "wmdeploy.exporter", "wmdeploy.torch_module"))}, m


@pytest.mark.parametrize("name", ["export", "verify", "optimize", "quantize", "profile", "annotate", "load",
                                  "generate", "drift_report", "profile_server", "triton_repository", "chat",
                                  "export_hf"])
def test_the_python_api_is_plain_functions(name):
    fn = getattr(wmdeploy, name)
    assert isinstance(fn, types.FunctionType) and not isinstance(fn, types.ModuleType)
    assert fn.__doc__
    # importing every module of the package must not rebind the function to a module of the same name
    import importlib  # noqa: PLC0415

    for module in ("wmdeploy.cli", "wmdeploy.exporter", "wmdeploy.verifier", "wmdeploy.annotation",
                   "wmdeploy.profiling.runner", "wmdeploy.transform.quantizer", "wmdeploy.transform.optimizer"):
        importlib.import_module(module)

    assert getattr(wmdeploy, name) is fn


def test_no_public_name_is_also_a_module_name():
    """``import wmdeploy.X`` binds the package attribute X to the module, so a public function named after a
    module is replaced by it once anything imports that module (``wmdeploy.chat`` was, in one test order)."""
    package = Path(wmdeploy.__file__).parent
    clashes = [n for n in wmdeploy._LAZY if (package / f"{n}.py").exists() or (package / n / "__init__.py").exists()]
    assert not clashes


def test_import_wmdeploy_and_its_runtime_names_import_no_torch():
    code = ("import sys, wmdeploy; wmdeploy.load; wmdeploy.Stream; wmdeploy.verify; wmdeploy.profile; "
            "import wmdeploy.streaming, wmdeploy.runners, wmdeploy.verifier; "
            "print(sorted(m for m in ('torch', 'onnx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
