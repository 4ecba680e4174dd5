"""Imports point down the layers (data < models < distill < evaluate < deploy) and never in a
circle, function-level imports included; read with the standard library's `ast`. Package
`__init__`s import nothing (their names load on first use), so importing a package loads no
torch; evaluate and deploy build encoders through `models`, never through the training recipe."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import sonodistill

PACKAGE = Path(sonodistill.__file__).resolve().parent
LAYERS = {"data": 1, "models": 2, "distill": 3, "evaluate": 4, "deploy": 5}
HELPERS = {"config", "progress", "io", "errors", "utils", "registry"}
# (HELPERS sit below every layer; anything else at the top -- cli, demo, report -- above them all.)
HEAVY = ("torch", "timm", "torchvision", "lightning_fabric", "kornia", "sklearn", "pandas", "cv2")
HEAVY += ("scipy", "onnxruntime", "fastapi", "matplotlib", "smp", "segmentation_models_pytorch")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every sonodistill module `module` imports, at any depth of its code. `from P import X`
    counts as importing P (its __init__ runs) and P.X when X is a module."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(
                f"{target}.{a.name}" for a in node.names if is_module(f"{target}.{a.name}")
            )
    return {name for name in found if name.split(".")[0] == "sonodistill" and name != module}


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        graph[name] = imported(ast.parse(path.read_text()), name, path.name == "__init__.py")
    return graph


def layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) < 2:
        return 0
    return LAYERS.get(parts[1], 0 if parts[1] in HELPERS else 6)


def upward(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{m} -> {t}"
        for m, targets in graph.items()
        for t in targets
        if m.split(".")[1:2] != t.split(".")[1:2] and layer(t) > layer(m)
    )


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_points_up_a_layer():
    assert upward(import_graph()) == []


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_checks_see_function_level_upward_imports_and_cycles():
    source = "def f():\n    from sonodistill.deploy.export import export\n"
    graph = {"sonodistill.data.x": imported(ast.parse(source), "sonodistill.data.x", False)}
    assert upward(graph) == ["sonodistill.data.x -> sonodistill.deploy.export"]
    relative = imported(ast.parse("from ..evaluate import suite"), "sonodistill.data.x", False)
    assert "sonodistill.evaluate.suite" in relative and "sonodistill.evaluate" in relative
    loop = {
        "sonodistill.data.a": {"sonodistill.data.b"},
        "sonodistill.data.b": {"sonodistill.data.a"},
    }
    assert cycles(loop) == [["sonodistill.data.a", "sonodistill.data.b"]]
    assert cycles({"sonodistill.data.a": {"sonodistill.models.b"}}) == []


def test_test_modules_share_helpers_through_conftest_only():
    tests = Path(__file__).resolve().parent
    offenders = []
    for path in sorted(tests.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            for name in names:  # `conftest` is the one name helpers are imported by
                if name.startswith(("test_", "tests")):
                    offenders.append(f"{path.name} imports {name}")
    assert offenders == []


# --- packages that load nothing, and evaluate/deploy without distill ------------------------------


def test_package_inits_import_nothing_at_module_level():
    """A package `__init__` imports at most `sonodistill.utils.lazy` (and typing): its public names
    are looked up on first use (PEP 562), so `import sonodistill.deploy.runtimes` runs no other
    module."""
    offenders = []
    for path in sorted(PACKAGE.rglob("__init__.py")):
        for node in ast.parse(path.read_text()).body:  # module level only
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            offenders += [
                f"{module_name(path)} imports {n}"
                for n in names
                if n not in ("sonodistill.utils.lazy", "typing", "__future__")
            ]
    assert offenders == []


def test_importing_every_package_loads_no_heavy_module():
    code = (
        "import sys, sonodistill.data, sonodistill.models, sonodistill.distill, "
        "sonodistill.evaluate, sonodistill.deploy, sonodistill.deploy.app, sonodistill.cli\n"
        "import sonodistill.models.specs, sonodistill.utils.fields, sonodistill.utils.rundir\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]"


def distill_users(graph: dict[str, set[str]], package: str) -> list[str]:
    return sorted(
        f"{m} -> {t}"
        for m, targets in graph.items()
        if m.split(".")[1:2] == [package]
        for t in targets
        if t.split(".")[1:2] == ["distill"]
    )


@pytest.mark.parametrize(
    "package",
    [
        "evaluate",
        "deploy",
    ],
)
def test_evaluate_and_deploy_import_nothing_from_distill(package):
    assert distill_users(import_graph(), package) == []


def registry_modules() -> list[tuple[str, str]]:
    """(declaring module, module named in a `Registry(..., modules=...)` call) of the package."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "Registry":
                for keyword in node.keywords:
                    if keyword.arg == "modules":
                        found += [
                            (module_name(path), c.value)
                            for c in ast.walk(keyword.value)
                            if isinstance(c, ast.Constant) and isinstance(c.value, str)
                        ]
    return found


def test_registries_load_modules_of_their_own_layer_or_below():
    pairs = registry_modules()
    assert ("sonodistill.models.specs", "sonodistill.models.families.timm_cnn") in pairs
    assert upward({m: {t} for m, t in pairs}) == []
    assert upward({"sonodistill.models.specs": {"sonodistill.distill.loss"}})  # it can fail
