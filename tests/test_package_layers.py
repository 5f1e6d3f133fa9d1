"""The Python package in layers: each module imports only modules of its own
layer or the layers below it, no two modules import each other (at the top
or inside a function), and each imports alone in a fresh process."""

import ast
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "bn_ext"

# Lowest first: the operators and their functional calls; the modules; the
# transforms of a model (conversion, activation fusion, folding,
# equalization, recalibration); the tools run from the command line.
LAYERS = {
    "ops": {"_C", "_build_info", "cpu", "memory", "functional", "distributed"},
    "modules": {"norm_classes", "modules"},
    "transforms": {"nn", "conversion", "activation_fusion", "fold_arithmetic", "fold_graph",
                   "quantization_diagnostics", "fold_verification", "fold", "equalization", "onnx_graph", "onnx_fold",
                   "onnx_equalization", "recalibration"},
    "tools": {"bench", "demo", "equalization_bench", "__main__", "__init__"},
}
RANK = {module: rank for rank, modules in enumerate(LAYERS.values()) for module in modules}
# The package's modules, and its subpackages (the bench) as one module each.
MODULES = sorted([p.stem for p in PACKAGE.glob("*.py")] + [p.parent.name for p in PACKAGE.glob("*/__init__.py")])


def _files(module: str) -> list[pathlib.Path]:
    return sorted((PACKAGE / module).glob("*.py")) if (PACKAGE / module).is_dir() else [PACKAGE / f"{module}.py"]


def _imports(module: str) -> set[str]:
    """The bn_ext modules `module` imports, anywhere in its code."""
    found = set()
    for node in (n for f in _files(module) for n in ast.walk(ast.parse(f.read_text()))):
        if isinstance(node, ast.ImportFrom) and node.module == "bn_ext":
            found |= {alias.name for alias in node.names if alias.name in RANK}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bn_ext."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("bn_ext.")}
    return found - {module}


def test_every_module_has_a_layer():
    assert set(MODULES) <= set(RANK), sorted(set(MODULES) - set(RANK))


@pytest.mark.parametrize("module", MODULES)
def test_imports_only_its_layer_and_below(module):
    above = {m for m in _imports(module) if RANK[m] > RANK[module]}
    assert not above, f"bn_ext.{module} imports from a higher layer: {sorted(above)}"


def test_no_import_circle():
    graph = {m: _imports(m) for m in MODULES if m not in LAYERS["tools"]}

    def reaches(start, target, seen):
        for m in graph.get(start, ()):
            if m == target or (m not in seen and (seen.add(m) or reaches(m, target, seen))):
                return True
        return False

    circles = [m for m in graph if reaches(m, m, set())]
    assert not circles, f"modules on an import circle: {circles}"


@pytest.mark.parametrize("module", [m for m in MODULES if m not in ("__main__", "_C")])
def test_imports_alone_in_a_fresh_process(module):
    name = "bn_ext" if module == "__init__" else f"bn_ext.{module}"
    result = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
