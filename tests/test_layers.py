"""Folders = import paths = layers (issue 22): what each layer of nnunet_heart_ext may import.

Read from the source (the AST of every module, nothing imported), lazy imports inside functions
included. The table below is what the code does, stated once; a new edge between layers or a
new dependency of a layer is a decision: change the table in the same commit.

Neither `nnunet` nor `trainers` imports the other: the trainers ask for the extension's inference
with a class attribute the predictor reads (nnunet/patching.py). Surprises the table records:
`data` imports nnunetv2 in one place, lazily
(data/prepare.py: nnU-Net's generate_dataset_json writes dataset.json); `pipeline` imports no
plug-in: it runs nnU-Net's and the extension's commands as subprocesses (`nnunet-heart report`
too: the pipeline does not import `report`, which reads nnU-Net's outputs itself, without nnunetv2).
"""
import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "nnunet_heart_ext"
ANY = None  # no restriction

# layer -> (layers of the extension it may import, third-party top-level modules it may import).
# The standard library is always allowed. Layers: `root` = nnunet_heart_ext/__init__.py and
# _hook.py (run at every interpreter start by the .pth: stdlib only, so `import
# nnunet_heart_ext.kernels` needs no nnunetv2), `cli` = cli.py, every other layer = its folder.
LAYERS = {
    "root": (set(), set()),
    "kernels": ({"kernels"}, {"numpy", "numba", "torch", "triton", "cc3d", "isal"}),
    "data": ({"kernels", "data"}, {"numpy", "SimpleITK", "nibabel", "tqdm", "nnunetv2"}),
    "nnunet": ({"kernels", "data", "nnunet"},
               {"numpy", "torch", "tqdm", "nnunetv2", "batchgenerators", "acvl_utils", "openvino"}),
    "trainers": ({"kernels", "data", "trainers"},
                 {"numpy", "torch", "nnunetv2", "batchgenerators", "acvl_utils"}),
    "pipeline": ({"data", "pipeline"}, {"torch", "nnunetv2"}),
    "report": ({"kernels", "data", "report"}, {"numpy", "SimpleITK", "cc3d", "PIL", "tqdm"}),
    "cli": (ANY, ANY),
}
SUBPACKAGES = {"kernels", "data", "nnunet", "trainers", "pipeline", "report"}


def layer_of(module: str):
    """The layer of an nnunet_heart_ext module name, or None for other modules."""
    parts = module.split(".")
    if parts[0] != "nnunet_heart_ext":
        return None
    if len(parts) == 1 or parts[1] == "_hook":
        return "root"
    if parts[1] == "cli":
        return "cli"
    return parts[1] if parts[1] in SUBPACKAGES else f"unknown ({parts[1]})"


def imported_modules(source: str):
    """(line, module) for every import in `source`, at any depth; `from a import b` gives a.b
    (b may be a module) and a."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"line {node.lineno}: relative import (the project uses absolute ones)"
            yield node.lineno, node.module
            for alias in node.names:
                if alias.name != "*":
                    yield node.lineno, f"{node.module}.{alias.name}"


def violations(layer: str, source: str):
    """The imports of `source` (a module of `layer`) that the table does not allow."""
    allowed_layers, allowed_third_party = LAYERS[layer]
    found = []
    for line, module in imported_modules(source):
        top = module.split(".")[0]
        if top == "nnunet_heart_ext":
            target = layer_of(module)
            if allowed_layers is not ANY and target not in allowed_layers and target != layer:
                found.append(f"line {line}: {module} (layer {target})")
        elif top not in sys.stdlib_module_names and allowed_third_party is not ANY \
                and top not in allowed_third_party:
            found.append(f"line {line}: {module} (third party)")
    # `from nnunet_heart_ext.kernels import x` also yields nnunet_heart_ext.kernels.x: report once
    return sorted(set(found))


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 30
    return [(module_name(f), f) for f in files if "__pycache__" not in f.parts]


def test_every_module_imports_only_what_its_layer_may():
    problems = {}
    for name, path in package_modules():
        layer = layer_of(name)
        assert layer in LAYERS, f"{name}: {layer} is no layer of the table"
        found = violations(layer, path.read_text())
        if found:
            problems[name] = found
    assert not problems, f"imports the layer table does not allow: {problems}"


def test_the_checker_finds_violations():
    """The checker itself, on made-up sources: every rule can fail."""
    assert violations("kernels", "import nnunetv2") == ["line 1: nnunetv2 (third party)"]
    assert violations("kernels", "def f():\n    import SimpleITK as sitk") == ["line 2: SimpleITK (third party)"]
    assert violations("kernels", "from batchgenerators.utilities import x") != []
    assert violations("kernels", "from nnunet_heart_ext.data import io") == \
        ["line 1: nnunet_heart_ext.data (layer data)", "line 1: nnunet_heart_ext.data.io (layer data)"]
    assert violations("kernels", "from nnunet_heart_ext import dataset") != []  # a module of the root layer
    assert violations("data", "from nnunet_heart_ext.nnunet.registry import names") != []
    assert violations("data", "import nnunet_heart_ext.trainers") != []
    assert violations("nnunet", "from nnunet_heart_ext.pipeline import steps") != []
    assert violations("trainers", "from nnunet_heart_ext.pipeline.options import parse") != []
    assert violations("pipeline", "from nnunet_heart_ext.nnunet import predictor") != []
    assert violations("pipeline", "from nnunet_heart_ext.report import build") != []
    assert violations("report", "from nnunet_heart_ext.pipeline import nnunet_outputs") != []
    assert violations("report", "import torch") != [] and violations("report", "import matplotlib") != []
    assert violations("root", "import numpy") != [] and violations("root", "import nnunet_heart_ext.data") != []
    assert violations("kernels", "import os, math\nimport numpy as np\nfrom nnunet_heart_ext.kernels import _triton\n"
                                 "def f():\n    import torch, triton.language") == []
    assert violations("cli", "import nnunetv2\nfrom nnunet_heart_ext.pipeline import main") == []
    assert layer_of("nnunet_heart_ext.planners") == "unknown (planners)"  # a module left at the old place


def import_graph(sources: dict) -> dict:
    """module -> the package's modules it imports (lazy imports included). `from a import b` is an
    edge to a.b when that is a module, and to the package a only for names that are not modules
    (importing a submodule runs the package's __init__, but not the functions it defines)."""
    graph = {name: set() for name in sources}
    for name, source in sources.items():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                graph[name].update(a.name for a in node.names if a.name in sources)
            elif isinstance(node, ast.ImportFrom) and node.module:
                modules = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in sources]
                graph[name].update(modules)
                if len(modules) < len(node.names) and node.module in sources:
                    graph[name].add(node.module)
        graph[name].discard(name)
    return graph


def cycles(graph: dict) -> list:
    """The groups of modules that import one another, directly or through others (Tarjan's
    strongly connected components of more than one module)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_layers_import_one_way():
    """No two layers may import each other, directly or through a third (cli aside: it may import
    anything and nothing imports it)."""
    layer_graph = {layer: {t for t in allowed if t != layer} for layer, (allowed, _) in LAYERS.items()
                   if allowed is not ANY}
    assert not cycles({layer: {t for t in targets if t in layer_graph} for layer, targets in layer_graph.items()})


def test_no_modules_import_one_another():
    """No import cycle between modules, inside a layer or across layers, lazy imports included."""
    graph = import_graph({name: path.read_text() for name, path in package_modules()})
    assert not cycles(graph), cycles(graph)


def test_the_cycle_checker_finds_cycles():
    sources = {"p": "", "p.a": "from p import b", "p.b": "def f():\n    import p.c", "p.c": "from p.a import x",
               "p.d": "from p import a"}
    assert cycles(import_graph(sources)) == [["p.a", "p.b", "p.c"]]
    sources["p.c"] = "import os"
    assert cycles(import_graph(sources)) == []
    assert cycles(import_graph({"p": "def main():\n    from p import a", "p.a": "from p import b", "p.b": ""})) == []


def _module_exists(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _names_bound_in(init: Path):
    """Names a package's __init__.py binds (None: a star import, anything may be there)."""
    names = set()
    for node in ast.walk(ast.parse(init.read_text())):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            if any(a.name == "*" for a in node.names):
                return None
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return names


def test_every_import_of_the_extension_names_a_module_of_this_tree():
    """Imports in the package, tests and benchmarks name modules that exist here. (In a
    development environment an editable install of another checkout can still answer an old
    module path, e.g. nnunet_heart_ext.planners, so a run of the tests alone would not notice.)"""
    files = [p for _, p in package_modules()] + sorted((ROOT / "tests").glob("*.py")) + \
        sorted((ROOT / "benchmarks").glob("*.py"))
    problems = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [(a.name, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets = [(node.module, a.name) for a in node.names]
            else:
                continue
            for module, name in targets:
                if not module.startswith("nnunet_heart_ext"):
                    continue
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                if not _module_exists(module):
                    problems.append(f"{where}: no module {module}")
                elif name and name != "*" and not _module_exists(f"{module}.{name}"):
                    bound = _names_bound_in(ROOT.joinpath(*module.split("."), "__init__.py")) \
                        if (ROOT.joinpath(*module.split("."), "__init__.py")).is_file() else None
                    if bound is not None and name not in bound:
                        problems.append(f"{where}: {module} has no {name}")
    assert not problems, problems


def _top_level_names(module: str):
    tree = ast.parse(ROOT.joinpath(*module.split(".")).with_suffix(".py").read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.ImportFrom):
            names.update(a.asname or a.name for a in node.names)
    return names


def test_dotted_paths_in_strings_name_modules_of_this_tree():
    """The hook's and the registry's "module:attribute" targets, and every dotted
    nnunet_heart_ext.<x> or nnunet_heart_ext/<x>.py named in code, tests, scripts and docs."""
    from nnunet_heart_ext import _hook
    from nnunet_heart_ext.nnunet import registry

    targets = list(_hook.PATCHES.values()) + [t for _, t in registry.REGISTRY.values()]
    for target in targets:
        module, attribute = target.split(":")
        assert _module_exists(module) and attribute in _top_level_names(module), target
    for module, allowed in [(t.split(":")[0], {"nnunet"}) for t in _hook.PATCHES.values()] + \
            [(t.split(":")[0], {"nnunet", "trainers"}) for _, t in registry.REGISTRY.values()] + \
            [(m, {"trainers"}) for _, m in registry.GENERATED.values()]:
        assert _module_exists(module) and layer_of(module) in allowed, module

    texts = [p for _, p in package_modules()] + sorted((ROOT / "tests").glob("*.py")) + \
        sorted((ROOT / "benchmarks").glob("*.py")) + sorted((ROOT / "benchmarks").glob("*.sh")) + \
        [ROOT / n for n in ("README.md", "benchmarks/RESULTS.md", "setup.py", "ensemble_pipeline.sh", ".ci/run")]
    texts.remove(Path(__file__).resolve())  # its made-up sources name old paths on purpose
    problems = []
    for path in texts:
        text = path.read_text()
        for match in re.finditer(r"\bnnunet_heart_ext\.([A-Za-z_]\w*)", text):
            first = match.group(1)
            if first != "pth" and not _module_exists(f"nnunet_heart_ext.{first}"):
                problems.append(f"{path.relative_to(ROOT)}: {match.group(0)}")
        for match in re.finditer(r"\bnnunet_heart_ext/([\w/]+\.py)\b", text):
            if not (PACKAGE / match.group(1)).is_file():
                problems.append(f"{path.relative_to(ROOT)}: {match.group(0)}")
    assert not problems, problems


def test_top_level_kernels_and_trainers_are_symlinks_into_the_package():
    for name in ("kernels", "trainers"):
        link = ROOT / name
        assert link.is_symlink() and os.readlink(link) == f"nnunet_heart_ext/{name}", name
        assert link.resolve() == (PACKAGE / name).resolve()


BLOCKED = ("nnunetv2", "batchgenerators", "batchgeneratorsv2", "acvl_utils", "SimpleITK")
WITHOUT_NNUNET = f"""
import importlib, pkgutil, sys
for name in [m for m in sys.modules if m.split(".")[0] in ("nnunet_heart_ext",) + {BLOCKED!r}]:
    del sys.modules[name]  # the .pth imported the hook (and the package root) at start-up: again
for name in {BLOCKED!r}:
    sys.modules[name] = None  # `import name` raises ImportError
import nnunet_heart_ext, nnunet_heart_ext._hook, nnunet_heart_ext.data, nnunet_heart_ext.nnunet
import nnunet_heart_ext.kernels as kernels
for module in pkgutil.iter_modules(kernels.__path__):
    importlib.import_module(f"nnunet_heart_ext.kernels.{{module.name}}")
print("ok")
"""


def test_kernels_import_without_nnunet():
    """What benchmarks/gpu_check.sh and the Triton-less test rely on, run for real: the package
    root, the hook, the subpackages' __init__ and every kernel import without nnU-Net and its
    libraries."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, "-c", WITHOUT_NNUNET], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_every_layer_has_modules(layer):
    """The table names no layer that the tree lacks."""
    assert any(layer_of(name) == layer for name, _ in package_modules())
