"""The library's layering, read from the source (no import is executed): calibflow/ is plain
Python over files, MLflow lives in calibflow/tracking/, Prefect in tasks/ and flows/.

- Only calibflow/tracking/ names MLflow in an import statement, anywhere in the file; no module of
  the library names Prefect, nor the layers above it (tasks/, flows/, cli/).
- Importing any other module, except those on the registry's side (the tracking package and the use
  cases after registration in calibflow/lifecycle/), does not load MLflow, Prefect or the tracking
  package: the transitive closure of their module-level imports reaches none of them. Imports inside
  functions run only when called.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

from tests.conftest import REPO

FRAMEWORKS = ("mlflow", "prefect")
TRACKING = "calibflow.tracking"
# Modules that read or move registered versions on the CLI's behalf: the tracking package itself and
# the use cases after registration (promote, evaluate, monitor, recalibrate).
REGISTRY_SIDE_PACKAGES = (TRACKING, "calibflow.lifecycle")


def registry_side(module: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in REGISTRY_SIDE_PACKAGES)


def _imported(node: ast.AST, package: str) -> list[str]:
    """Module names an import statement loads (`from calibflow import registry` loads calibflow.tracking.registration)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: from . import x
            parent = package.split(".")[: len(package.split(".")) - node.level]
            base = ".".join(parent + ([base] if base else []))
        return [base] + [f"{base}.{alias.name}" for alias in node.names]
    return []


def _module_level(tree: ast.Module):
    """Statements that run on import: the module body, into if/try/with blocks, not into functions or classes."""
    pending = list(tree.body)
    while pending:
        node = pending.pop()
        yield node
        if isinstance(node, (ast.If, ast.Try, ast.With)):
            for field in ("body", "orelse", "finalbody", "handlers"):
                pending.extend(getattr(node, field, []))
        elif isinstance(node, ast.ExceptHandler):
            pending.extend(node.body)


@cache
def import_graph(package_dir: Path) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """({module: names imported anywhere in it}, {module: names imported at module level})."""
    anywhere, on_import = {}, {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        tree = ast.parse(path.read_text(), str(path))
        anywhere[name] = _with_parents({m for node in ast.walk(tree) for m in _imported(node, name)})
        on_import[name] = _with_parents({m for node in _module_level(tree) for m in _imported(node, name)})
    return anywhere, on_import


def _with_parents(modules: set[str]) -> set[str]:
    """Importing a.b.c runs a/__init__ and a/b/__init__ first."""
    return {".".join(m.split(".")[:i]) for m in modules for i in range(1, len(m.split(".")) + 1)}


def loads_on_import(module: str, on_import: dict[str, set[str]]) -> set[str]:
    """Every module importing `module` loads: the transitive closure over the package's own modules."""
    seen, pending = set(), [module]
    while pending:
        current = pending.pop()
        for imported in on_import.get(current, ()):
            if imported not in seen:
                seen.add(imported)
                pending.append(imported)
    return seen


def _frameworks(names: set[str]) -> set[str]:
    return {n for n in names if n.split(".")[0] in FRAMEWORKS}


def test_only_the_tracking_package_imports_mlflow_and_nothing_imports_prefect():
    anywhere, _ = import_graph(REPO / "calibflow")
    offenders = {
        module: sorted(_frameworks(names))
        for module, names in anywhere.items()
        if not module.startswith(TRACKING + ".") and _frameworks(names)
    }
    assert offenders == {}


@pytest.mark.parametrize("module", sorted(m for m in import_graph(REPO / "calibflow")[1] if not registry_side(m)))
def test_importing_the_library_loads_neither_mlflow_prefect_nor_the_registry(module):
    _, on_import = import_graph(REPO / "calibflow")
    loaded = loads_on_import(module, on_import)
    assert _frameworks(loaded) == set()
    assert not {m for m in loaded if m.startswith(TRACKING + ".")}


def test_the_pipeline_hands_the_gates_ready_predictions_and_never_reads_the_champion():
    _, on_import = import_graph(REPO / "calibflow")
    assert not {"calibflow.lifecycle.promotion", "calibflow.lifecycle.reproduce"} & loads_on_import(
        "calibflow.pipeline", on_import
    )


def test_the_scan_sees_an_import_through_another_module_and_ignores_one_inside_a_function(tmp_path):
    package = tmp_path / "lib"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "core.py").write_text("from lib import helper\n")
    (package / "helper.py").write_text("try:\n    import mlflow.pyfunc\nexcept ImportError:\n    pass\n")
    (package / "lazy.py").write_text("def load():\n    from prefect import flow\n")
    anywhere, on_import = import_graph(package)
    assert _frameworks(loads_on_import("lib.core", on_import)) == {"mlflow", "mlflow.pyfunc"}
    assert _frameworks(loads_on_import("lib.lazy", on_import)) == set()
    assert _frameworks(anywhere["lib.lazy"]) == {"prefect", "prefect.flow"}


def test_the_library_never_imports_the_layers_above_it():
    anywhere, _ = import_graph(REPO / "calibflow")
    above = ("tasks", "flows", "cli")
    offenders = {m: sorted(n for n in names if n.split(".")[0] in above) for m, names in anywhere.items()}
    assert {m: names for m, names in offenders.items() if names} == {}


def test_errors_is_a_leaf():
    anywhere, _ = import_graph(REPO / "calibflow")
    assert {n for n in anywhere["calibflow.errors"] if n.split(".")[0] == "calibflow"} == set()


# The library's layers, lowest first: a module imports only from its own layer or those below it.
# config sits above the domain modules whose defaults it reads (calibflow.metrics' bin count, the
# calibrators' temperature range, ...): they receive its records and name them only for type
# checkers. The pipeline's steps compose the domain; tracking stores what they produce; lifecycle
# (promote, evaluate, monitor, recalibrate) reads it back.
LAYERS = (
    ("errors",),
    ("names", "environment", "progress", "disk_cache", "leftovers"),
    ("metrics",),
    ("calibrators",),
    ("data",),
    ("training",),
    ("gates",),
    ("evaluation",),
    ("config",),
    ("pipeline",),
    ("tracking",),
    ("lifecycle",),
)
# The DDP worker process rebuilds the TrainConfig it was sent (its bundle holds plain values).
UPWARD_ALLOWED = {("calibflow.training.distributed", "calibflow.config")}


def _runtime_imports(path: Path) -> set[str]:
    """Modules of calibflow a file imports anywhere except under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text(), str(path))
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for inner in ast.walk(node)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only or not isinstance(node, ast.ImportFrom) or node.level or not node.module:
            continue
        if node.module == "calibflow":
            found |= {f"calibflow.{alias.name}" for alias in node.names}
        elif node.module.startswith("calibflow."):
            found.add(node.module)
    return found


def _layer(module: str) -> int:
    top = module.split(".")[1]
    return next(i for i, names in enumerate(LAYERS) if top in names)


def test_every_part_of_the_library_has_a_layer():
    tops = {p.stem if p.is_file() else p.name for p in (REPO / "calibflow").iterdir() if p.name != "__init__.py"}
    tops = {t for t in tops if not t.startswith((".", "__"))}
    assert tops == {name for names in LAYERS for name in names}


def test_no_import_reaches_up_a_layer():
    upward = []
    for path in sorted((REPO / "calibflow").rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        if len(parts) < 2 or parts[1] == "__init__":
            continue
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        for imported in _runtime_imports(path):
            if _layer(imported) > _layer(module) and (module, ".".join(imported.split(".")[:2])) not in UPWARD_ALLOWED:
                upward.append(f"{module} -> {imported}")
    assert upward == []


def test_the_layer_check_sees_an_import_up_and_ignores_one_for_type_checkers(tmp_path):
    module = tmp_path / "checks.py"
    module.write_text(
        "from typing import TYPE_CHECKING\n"
        "from calibflow.metrics import binned\n"
        "def f():\n    from calibflow.config import load_config\n"
        "if TYPE_CHECKING:\n    from calibflow.config import GatesConfig\n"
    )
    assert _runtime_imports(module) == {"calibflow.metrics", "calibflow.config"}
    assert _layer("calibflow.config") > _layer("calibflow.gates.checks")
