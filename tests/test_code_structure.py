"""The house rules of masked_opt's code, checked on its source (no backend
needed): module and function sizes, backend code only in backend modules,
every private Keras/TensorFlow API listed in `masked_opt/_compat.py`, and
imports that point one way (no cycle, `_saving` never imports the optimizer).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

from masked_opt import _compat

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "masked_opt"
MODULES = sorted(PACKAGE.rglob("*.py"))
BACKEND_DIR = PACKAGE / "_backend"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60  # code lines, the docstring not counted
MAX_ORCHESTRATOR_LINES = 360


def _name(path: pathlib.Path) -> str:
    return str(path.relative_to(PACKAGE.parent))


def _tree(path: pathlib.Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def test_every_module_is_at_most_500_lines():
    long = {_name(p): n for p in MODULES if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, long


def test_optimizer_module_is_a_short_orchestrator():
    lines = len((PACKAGE / "optimizer.py").read_text().splitlines())
    assert lines <= MAX_ORCHESTRATOR_LINES, lines


def _function_lengths(path: pathlib.Path):
    for node in ast.walk(_tree(path)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
                body = body[1:]  # the docstring
            if body:
                yield node.name, node.lineno, body[-1].end_lineno - body[0].lineno + 1


def test_no_function_is_longer_than_60_lines():
    long = [f"{_name(p)}:{line} {name} ({n} lines)" for p in MODULES for name, line, n in _function_lengths(p)
            if n > MAX_FUNCTION_LINES]
    assert not long, long


def _imported_modules(tree: ast.Module) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
    return out


def _outside_backend():
    return [p for p in MODULES if BACKEND_DIR not in p.parents]


def test_backends_are_imported_and_asked_for_only_in_backend_modules():
    offenders = []
    for path in _outside_backend():
        source = path.read_text()
        for module in _imported_modules(_tree(path)):
            if module.split(".")[0] in ("tensorflow", "jax", "torch"):
                offenders.append(f"{_name(path)} imports {module}")
        if "backend.backend()" in source or "BACKEND ==" in source:
            offenders.append(f"{_name(path)} asks which backend is active")
    assert not offenders, offenders


def _defined_private_names() -> set[str]:
    """Private attribute and function names masked_opt defines itself."""
    names = set()
    for path in MODULES:
        for node in ast.walk(_tree(path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.alias):
                names.add(node.asname or node.name.split(".")[-1])
    return {n for n in names if n.startswith("_")}


def _foreign_private_uses(path: pathlib.Path, ours: set[str]) -> set[str]:
    """Private attributes `path` reads that masked_opt does not define, and
    private modules it imports."""
    found = set()
    tree = _tree(path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            if node.attr not in ours:
                found.add(node.attr)
    for module in _imported_modules(tree):
        if module.startswith(("keras.src", "tensorflow.python")):
            found.add(module)
    if "__internal__" in path.read_text():
        found.add("tf.__internal__")
    return found


def test_private_keras_and_tf_apis_are_listed_and_used_only_by_compat_and_backends():
    ours = _defined_private_names()
    listed = " ".join(f"{api.name} {api.owner}" for api in _compat.PRIVATE_APIS)
    unlisted, misplaced = [], []
    for path in MODULES:
        for name in _foreign_private_uses(path, ours):
            if name.split(".")[-1] not in listed and name not in listed:
                unlisted.append(f"{_name(path)}: {name}")
            if path.name != "_compat.py" and BACKEND_DIR not in path.parents:
                misplaced.append(f"{_name(path)}: {name}")
    assert not unlisted, f"private APIs missing from _compat.PRIVATE_APIS: {unlisted}"
    assert not misplaced, f"private APIs used outside _compat.py and _backend/: {misplaced}"


def test_private_api_table_says_where_each_was_checked():
    for api in _compat.PRIVATE_APIS:
        assert api.used_for and api.checked_on, api


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_level(body: list) -> list:
    """Module-level statements, with the branches of module-level `if`s (the
    backend choice), but not `if TYPE_CHECKING:`."""
    out = []
    for node in body:
        out.append(node)
        if isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.dump(node.test):
            out += _module_level(node.body + node.orelse)
    return out


def _package_imports() -> dict[str, set[str]]:
    """masked_opt module -> the masked_opt modules it imports at module level."""
    names = {_module_name(p) for p in MODULES}
    graph = {}
    for path in MODULES:
        deps = set()
        for node in _module_level(_tree(path).body):  # lazy imports inside functions are fine
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in names)
            elif isinstance(node, ast.ImportFrom) and node.module in names:
                for alias in node.names:  # `from pkg import submodule` imports the submodule
                    sub = f"{node.module}.{alias.name}"
                    deps.add(sub if sub in names else node.module)
        me = _module_name(path)
        graph[me] = {d for d in deps if d != me and not me.startswith(d + ".")}
    return graph


def test_imports_point_one_way():
    graph = _package_imports()
    assert "masked_opt.optimizer" not in graph["masked_opt._saving"]
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for dep in graph.get(node, ()):
            if dep == "masked_opt" or node == "masked_opt":
                continue  # the package re-exports; submodules never import it at module level
            if state.get(dep) == 1:
                pytest.fail(f"import cycle: {' -> '.join(stack + [node, dep])}")
            if dep not in state:
                visit(dep, stack + [node])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [])


def test_package_modules_never_import_the_package_root():
    offenders = [m for m, deps in _package_imports().items() if m != "masked_opt" and "masked_opt" in deps]
    assert not offenders, offenders


MAX_IMPORT_FLOORS = 8  # issue 27: 11 before


def test_the_import_graph_is_at_most_8_floors_deep():
    # A floor is a module on the longest chain of module-level imports, the
    # package root included (masked_opt -> summary -> optimizer -> ... -> _compat).
    graph = _package_imports()
    longest: dict[str, list[str]] = {}

    def chain(module):
        if module not in longest:
            below = [chain(d) for d in graph.get(module, ()) if d != "masked_opt"]
            longest[module] = [module] + max(below, key=len, default=[])
        return longest[module]

    deepest = chain("masked_opt")
    assert len(deepest) <= MAX_IMPORT_FLOORS, " -> ".join(deepest)
    assert all(len(chain(m)) < len(deepest) for m in graph if m != "masked_opt")


def test_only_the_registry_writes_its_specs_and_config_keys_are_built_once():
    # Saving has one owner (`_saving.Saving`); a registry's specs change only
    # through its own methods, and the config keys of the entries are spelled
    # by `_saving.config_key` alone.
    writes, literals = [], []
    for path in MODULES:
        for node in ast.walk(_tree(path)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, (ast.AugAssign, ast.AnnAssign)) else []
            for target in targets:
                if isinstance(target, ast.Attribute) and target.attr in ("specs", "_specs") and path.name != "registry.py":
                    writes.append(f"{_name(path)}:{node.lineno}")
            if isinstance(node, ast.Constant) and node.value in ("mask_entries", "multiplier_entries"):
                literals.append(f"{_name(path)}:{node.lineno}")
    assert not writes, writes
    assert not literals, literals
