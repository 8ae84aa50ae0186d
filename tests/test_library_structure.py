"""``pruning`` is a pure library: no command lines, nothing from the application (data, engine, main,
tools), and a module graph without cycles, read from the source of every module."""
import ast
import importlib
import os
import pkgutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

import pytest

import pruning

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = Path(pruning.__file__).parent
APPLICATION = {"data", "engine", "main", "tools"}


def pruning_modules() -> Dict[str, Path]:
    """Every module of the package (``pruning``, ``pruning.flops``, ``pruning.patch.timm``, ...) -> its file."""
    modules = {"pruning": PACKAGE_DIR / "__init__.py"}
    for info in pkgutil.walk_packages([str(PACKAGE_DIR)], prefix="pruning."):
        spec = importlib.util.find_spec(info.name)
        modules[info.name] = Path(spec.origin)
    return modules


def imports_of(source: str, module: str, is_package: bool) -> List[Tuple[str, bool]]:
    """(absolute name imported, inside a function or class?) for every import statement in ``source``.

    ``from .x import y`` gives ``pkg.x.y`` when ``pkg.x.y`` could be a module and ``pkg.x`` otherwise;
    ``resolve_edges`` keeps whichever of them is a module of the package.
    """
    package = module if is_package else module.rpartition(".")[0]
    found: List[Tuple[str, bool]] = []

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((alias.name, inner) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base_parts = package.split(".")
                    base_parts = base_parts[:len(base_parts) - (child.level - 1)]
                    base = ".".join(base_parts + ([child.module] if child.module else []))
                else:
                    base = child.module
                found.append((base, inner))
                found.extend((f"{base}.{alias.name}", inner) for alias in child.names)
            visit(child, inner)

    visit(ast.parse(source), False)
    return found


def resolve_edges(imports: List[Tuple[str, bool]], modules: Set[str]) -> Set[Tuple[str, bool]]:
    """The package's own modules among ``imports`` (names that are not modules are dropped)."""
    return {(name, nested) for name, nested in imports if name in modules}


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One cycle of ``graph`` as a list of nodes (first repeated at the end), or None."""
    done: Set[str] = set()
    path: List[str] = []

    def walk(node: str) -> Optional[List[str]]:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        path.append(node)
        for target in sorted(graph.get(node, ())):
            cycle = walk(target)
            if cycle:
                return cycle
        path.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = walk(start)
        if cycle:
            return cycle
    return None


def module_graph() -> Tuple[Dict[str, Set[str]], Dict[str, Set[str]], Dict[str, List[str]]]:
    """(all intra-package edges, function-level intra-package edges, every top-level name imported) per module."""
    modules = pruning_modules()
    graph, nested_edges, top_level = {}, {}, {}
    for name, path in modules.items():
        imports = imports_of(path.read_text(), name, path.name == "__init__.py")
        edges = resolve_edges(imports, set(modules))
        graph[name] = {target for target, _ in edges if target != name}
        nested_edges[name] = {target for target, nested in edges if nested}
        top_level[name] = sorted({imported.split(".")[0] for imported, _ in imports})
    return graph, nested_edges, top_level


# --- the checks themselves are checked --------------------------------------------------------------

def test_the_import_reader_sees_relative_and_function_level_imports():
    source = ("from .schedules import token_counts\n"
              "from . import models\n"
              "def f():\n"
              "    from ..patch import get_config\n"
              "    import data\n")
    imports = imports_of(source, "pruning.sub.flops", is_package=False)
    assert ("pruning.sub.schedules", False) in imports
    assert ("pruning.sub.models", False) in imports
    assert ("pruning.patch", True) in imports and ("data", True) in imports
    modules = {"pruning.sub.schedules", "pruning.sub.models", "pruning.patch"}
    assert resolve_edges(imports, modules) == {("pruning.sub.schedules", False), ("pruning.sub.models", False),
                                               ("pruning.patch", True)}


def test_the_cycle_finder_finds_the_old_cycles():
    # the old graph: flops -> schedules -> flops (inside matched_flops_schedule), flops -> patch -> schedules
    old = {"flops": {"schedules", "patch"}, "schedules": {"flops"}, "patch": {"schedules"}}
    assert find_cycle(old) is not None
    assert find_cycle({"flops": {"counting", "state"}, "schedules": {"flops", "counting"}, "counting": set()}) is None


# --- the package ------------------------------------------------------------------------------------

def test_every_module_imports():
    for name in pruning_modules():
        importlib.import_module(name)


def test_no_module_imports_the_application():
    _, _, top_level = module_graph()
    for name, imported in top_level.items():
        assert not APPLICATION & set(imported), f"{name} imports {sorted(APPLICATION & set(imported))}"


def test_module_graph_has_no_cycle_counting_function_level_imports():
    graph, nested, _ = module_graph()
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"
    # the old dodges are gone: flops reads the compression from state, schedules imports flops at the top
    assert "pruning.state" in graph["pruning.flops"]
    assert not nested["pruning.flops"] and not nested["pruning.schedules"]
    # the arithmetic the patch adapters need sits below them
    for low in ("pruning.counting", "pruning.cost"):
        assert not {"pruning.patch", "pruning.flops", "pruning.schedules"} & graph[low], low


def test_no_command_line_programs_inside_the_library():
    for name, path in pruning_modules().items():
        tree = ast.parse(path.read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        assert "argparse" not in imported, name
        assert not any(isinstance(node, ast.FunctionDef) and node.name == "main" for node in tree.body), name
        assert "__main__" not in path.read_text(), name


def test_importing_every_module_loads_nothing_from_the_application():
    code = ("import importlib, pkgutil, sys, pruning\n"
            "for info in pkgutil.walk_packages(pruning.__path__, prefix='pruning.'):\n"
            "    importlib.import_module(info.name)\n"
            f"print(sorted(set(sys.modules) & set({sorted(APPLICATION)!r})))\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


ADAPTERS = ("pruning.patch.timm", "pruning.patch.hf", "pruning.patch.open_clip")


def test_the_compressed_layer_exists_once():
    """The attention, the reduction step and the class swap live in ``patch.layers``; a family adapter holds
    only its layout and what is its library's own, so it reaches none of them directly."""
    graph, _, _ = module_graph()
    modules = pruning_modules()
    below = {"pruning.compress", "pruning.scoring", "pruning.reduction", "pruning.merging", "pruning.methods"}
    for adapter in ADAPTERS:
        assert not below & graph[adapter], f"{adapter} imports {sorted(below & graph[adapter])}"
        tree = ast.parse(modules[adapter].read_text())
        used = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
        used |= {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
        assert not {"scaled_dot_product_attention", "softmax", "reduce_tokens"} & used, adapter
        swaps = [node for node in ast.walk(tree) if isinstance(node, ast.Assign)
                 and any(isinstance(t, ast.Attribute) and t.attr == "__class__" for t in node.targets)]
        # the one allowed: the DINOv2 classifiers' pooling swaps the model's class (restored by unpatch_layers)
        assert len(swaps) == (1 if adapter == "pruning.patch.hf" else 0), adapter
    assert "pruning.patch.layers" in graph["pruning.patch.timm"]


def test_a_models_shape_has_one_name():
    from pruning import flops, patch

    assert flops.model_shape is patch.model_shape
    for module in pruning_modules():
        names = set(vars(importlib.import_module(module)))
        assert not {"ViTShape", "vit_shape", "family_shape", "Geometry"} & names, module


@pytest.mark.parametrize("old, new", [("pruning.schedules", "matched_flops_schedule"),
                                      ("pruning.schedules", "token_counts"),
                                      ("pruning.schedules", "keep_rate_schedule"),
                                      ("pruning.patch", "get_config"), ("pruning.patch", "get_state"),
                                      ("pruning.benchmark", "measure_throughput"),
                                      ("pruning.benchmark", "compare_speed"),
                                      ("pruning.visualize", "save_token_grid"),
                                      ("pruning.flops", "analytic_flops"), ("pruning.flops", "model_shape"),
                                      ("pruning.patch", "model_shape")])
def test_public_names_stay_where_they_were(old, new):
    assert callable(getattr(importlib.import_module(old), new))
