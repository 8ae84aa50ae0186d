"""The layers of the repository, read from the source of every module: ``pruning`` < ``data`` < ``engine`` <
``main`` < ``tools``, each importing only its own layer and those below, with no import cycle between modules
(imports inside functions counted) or between packages at any nesting level (``pruning.core`` < ``pruning.patch``
< ``pruning``'s model-level modules); and ``pruning`` a pure library: no command lines."""
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
LAYERS = ("pruning", "data", "engine", "main", "tools")  # each may import only itself and those before it


def pruning_modules() -> Dict[str, Path]:
    """Every module of the package (``pruning``, ``pruning.flops``, ``pruning.patch.timm``, ...) -> its file."""
    modules = {"pruning": PACKAGE_DIR / "__init__.py"}
    for info in pkgutil.walk_packages([str(PACKAGE_DIR)], prefix="pruning."):
        spec = importlib.util.find_spec(info.name)
        modules[info.name] = Path(spec.origin)
    return modules


def repo_modules() -> Dict[str, Path]:
    """Every module of every layer (``main``, ``data.datasets``, ``tools.sweep``, ...) -> its file, found on disk
    (importing tools would run their path set-up)."""
    modules = {"main": ROOT / "main.py"}
    for layer in LAYERS:
        folder = ROOT / layer
        for path in sorted(folder.rglob("*.py")) if folder.is_dir() else ():
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def layer_of(module: str) -> str:
    return module.split(".")[0]


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


def resolve_edges(imports: List[Tuple[str, bool]], modules: Set[str], package: str = "") -> Set[Tuple[str, bool]]:
    """The modules of ``modules`` among ``imports`` (names that are not modules are dropped); with ``package``,
    a bare name is also looked up inside it (``python tools/x.py`` has tools/ on its path: ``import sweep``)."""
    edges = set()
    for name, nested in imports:
        if name in modules:
            edges.add((name, nested))
        elif package and f"{package}.{name}" in modules:
            edges.add((f"{package}.{name}", nested))
    return edges


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


def repo_graph() -> Tuple[Dict[str, Set[str]], Dict[str, Set[str]]]:
    """(module -> the repository's modules it imports anywhere in its source, layer -> the layers it imports)."""
    modules = repo_modules()
    graph: Dict[str, Set[str]] = {}
    for name, path in modules.items():
        imports = imports_of(path.read_text(), name, path.name == "__init__.py")
        own_folder = name.rpartition(".")[0] if path.name != "__init__.py" else name
        graph[name] = {target for target, _ in resolve_edges(imports, set(modules), own_folder) if target != name}
    layers: Dict[str, Set[str]] = {layer: set() for layer in LAYERS}
    for name, targets in graph.items():
        layers[layer_of(name)] |= {layer_of(target) for target in targets} - {layer_of(name)}
    return graph, layers


def repo_packages() -> Set[str]:
    """Every package and sub-package of the layers (``pruning``, ``pruning.patch``, ``engine``, ...)."""
    return {name for name, path in repo_modules().items() if path.name == "__init__.py"}


def package_at(module: str, packages: Set[str], level: int) -> str:
    """The package holding ``module`` seen at nesting ``level`` (1: ``pruning``, 2: ``pruning.patch``, ...): its
    deepest enclosing package of at most ``level`` parts (a package's ``__init__`` is the package itself); a
    module in no package (``main``) stands for itself."""
    parts = module.split(".")
    for size in range(min(level, len(parts)), 0, -1):
        name = ".".join(parts[:size])
        if name in packages:
            return name
    return module


def package_graph(graph: Dict[str, Set[str]], packages: Set[str], level: int) -> Dict[str, Set[str]]:
    """package -> the packages its modules import, with every module seen at nesting ``level``."""
    found: Dict[str, Set[str]] = {}
    for name, targets in graph.items():
        own = package_at(name, packages, level)
        found.setdefault(own, set()).update({package_at(target, packages, level) for target in targets} - {own})
    return found


def package_cycles(graph: Dict[str, Set[str]], packages: Set[str]) -> Dict[int, List[str]]:
    """level -> one cycle between the packages seen at that nesting level, for every level that has one."""
    deepest = max(len(name.split(".")) for name in packages)
    cycles = {level: find_cycle(package_graph(graph, packages, level)) for level in range(1, deepest + 1)}
    return {level: cycle for level, cycle in cycles.items() if cycle}


def upward_imports(graph: Dict[str, Set[str]]) -> List[str]:
    """``importer -> imported`` for every import of a later layer by an earlier one."""
    return sorted(f"{name} -> {target}" for name, targets in graph.items() for target in targets
                  if LAYERS.index(layer_of(target)) > LAYERS.index(layer_of(name)))


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


def test_the_layer_checks_find_the_old_faults():
    # engine.model <-> engine.zoo (zoo imported model inside a function); data.datasets imported engine.errors
    old = {"engine.model": {"engine.zoo"}, "engine.zoo": {"engine.model"}, "data.datasets": {"engine.errors"},
           "engine.errors": set(), "engine.options": {"data.datasets"}}
    assert find_cycle(old) is not None
    assert upward_imports(old) == ["data.datasets -> engine.errors"]
    assert upward_imports({"tools.sweep": {"main", "engine.options"}, "main": {"engine.model"}}) == []


def test_the_package_check_finds_the_old_package_cycle():
    # modules of pruning imported pruning.patch, whose modules imported pruning.counting: no cycle between modules
    old = {"pruning": {"pruning.patch"}, "pruning.flops": {"pruning.patch", "pruning.counting"},
           "pruning.counting": set(), "pruning.patch": {"pruning.patch.layers"},
           "pruning.patch.layers": {"pruning.counting"}, "engine.model": {"pruning.flops"}}
    packages = {"pruning", "pruning.patch", "engine"}
    assert find_cycle(old) is None
    assert package_cycles(old, packages) == {2: ["pruning", "pruning.patch", "pruning"]}
    new = {"pruning": {"pruning.patch", "pruning.core"}, "pruning.flops": {"pruning.patch", "pruning.core.counting"},
           "pruning.core": set(), "pruning.core.counting": set(), "pruning.patch": {"pruning.patch.layers"},
           "pruning.patch.layers": {"pruning.core.counting"}, "engine.model": {"pruning.flops"}}
    assert package_cycles(new, packages | {"pruning.core"}) == {}
    # sub-packages seen as one at a shallower level: a.x -> b, b -> a.sub.y is a cycle between a and b at level 2
    nested = {"p.a.x": {"p.b.z"}, "p.b.z": {"p.a.sub.y"}, "p.a.sub.y": set()}
    assert package_cycles(nested, {"p", "p.a", "p.b", "p.a.sub"}) == {2: ["p.a", "p.b", "p.a"]}
    assert package_at("main", {"pruning"}, 3) == "main" and package_at("pruning.core", {"pruning"}, 2) == "pruning"


def test_bare_imports_inside_tools_resolve_to_the_tool():
    imports = imports_of("from export_onnx import compress\nimport sweep_rows\n", "tools.deploy_benchmark", False)
    modules = {"tools.export_onnx", "tools.sweep_rows", "engine.zoo"}
    assert {target for target, _ in resolve_edges(imports, modules, "tools")} == modules - {"engine.zoo"}


# --- the repository's layers ---

def test_every_layer_imports_only_itself_and_the_layers_below():
    graph, _ = repo_graph()
    assert {"main", "data.datasets", "engine.zoo", "tools.sweep", "pruning.patch.timm"} <= set(graph)
    assert upward_imports(graph) == []


def test_no_import_cycle_between_modules_or_layers():
    graph, layers = repo_graph()
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"
    cycle = find_cycle(layers)
    assert cycle is None, f"import cycle between layers: {' -> '.join(cycle)}"
    assert layers["pruning"] == set() and layers["data"] <= {"pruning"}


def test_no_import_cycle_between_packages_at_any_nesting_level():
    graph, _ = repo_graph()
    packages = repo_packages()
    cycles = package_cycles(graph, packages)
    assert not cycles, "; ".join(f"level {level}: {' -> '.join(cycle)}" for level, cycle in cycles.items())
    assert {"pruning", "pruning.core", "pruning.patch", "data", "engine", "tools"} <= packages


def test_the_small_models_expect_the_normalisation_of_their_datasets():
    import timm

    import data
    import pruning.models  # noqa: F401

    for arch, dataset in (("vit_pico_patch2_8", "digits"), ("vit_pico_patch4_28", "FashionMNIST"),
                          ("vit_nano_patch4_28", "FashionMNIST")):
        cfg = timm.models.get_pretrained_cfg(arch)
        spec = data.DATASETS[dataset]
        assert (tuple(cfg.mean), tuple(cfg.std)) == (tuple(spec.mean), tuple(spec.std)), arch


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
    assert "pruning.core.state" in graph["pruning.flops"]
    assert not nested["pruning.flops"] and not nested["pruning.schedules"]


def test_the_core_sits_below_patch_and_patch_below_the_model_level_modules():
    """``pruning.core`` imports only itself; ``pruning.patch`` only itself and the core; the model-level modules
    (flops, schedules, benchmark, visualize, models) are imported by neither."""
    graph, _, _ = module_graph()
    allowed = {"pruning.core": ("pruning.core",), "pruning.patch": ("pruning.core", "pruning.patch")}
    for name, targets in graph.items():
        for package, below in allowed.items():
            if name == package or name.startswith(package + "."):
                outside = sorted(t for t in targets if not any(t == b or t.startswith(b + ".") for b in below))
                assert not outside, f"{name} imports {outside}"
    assert "pruning.patch" in graph["pruning.flops"] and "pruning.core.cost" in graph["pruning.patch.timm"]


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
    below = {f"pruning.core.{name}" for name in ("compress", "scoring", "reduction", "merging", "methods")}
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


def test_a_models_shape_has_one_name_and_one_analytic_count():
    """The library's ``ModelShape`` and ``analytic_flops`` are the only ones: the engine uses them, with no shape
    class or FLOPs count of its own."""
    from pruning import flops, patch

    assert flops.model_shape is patch.model_shape
    engine_modules = [name for name in repo_modules() if layer_of(name) == "engine"]
    for module in [*pruning_modules(), *engine_modules]:
        names = vars(importlib.import_module(module))
        assert not {"ViTShape", "vit_shape", "family_shape", "Geometry", "geometry"} & set(names), module
        # the family adapters have their own model_shape, which pruning.patch dispatches to; nothing else does
        library_only = ("ModelShape", "analytic_flops") if module.startswith("pruning.") else \
            ("ModelShape", "analytic_flops", "model_shape")
        for name in library_only:
            assert names.get(name, getattr(flops, name)) is getattr(flops, name), f"{module}.{name}"


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
