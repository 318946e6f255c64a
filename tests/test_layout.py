"""The package's layout as docs/architecture.md states it: each public module says its interface
(``__all__``), modules import one another through those interfaces, no private name crosses a
module (but the ``_capture`` package's interface), module-level imports form no cycle, and the
arrows point one way (core -> geometry -> paper; only the CLI imports the paper, lazily)."""

from __future__ import annotations

import ast
import importlib
import pathlib

import pytest

import splinelens

ROOT = pathlib.Path(splinelens.__file__).parent


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()
PUBLIC = sorted(m for m in MODULES if not any(p.startswith("_") for p in m.split(".")[1:]))


def _imports(path: pathlib.Path, top_level: bool) -> list[tuple[str, str, int]]:
    """(module, name, line) of each ``from splinelens... import name`` in a file (only those at
    module level if ``top_level``); ``import splinelens.x`` gives (x, '', line)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level else list(ast.walk(tree))
    out = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("splinelens"):
            out += [(node.module, a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [
                (a.name, "", node.lineno) for a in node.names if a.name.startswith("splinelens")
            ]
    return out


def _target(module: str, name: str) -> str:
    """The module an import reads: ``from splinelens.paper import figures`` reads figures."""
    return f"{module}.{name}" if f"{module}.{name}" in MODULES else module


@pytest.mark.parametrize("module", PUBLIC)
def test_each_public_module_states_its_interface(module: str) -> None:
    mod = importlib.import_module(module)
    assert isinstance(getattr(mod, "__all__", None), list), f"{module} has no __all__"
    missing = [n for n in mod.__all__ if not hasattr(mod, n)]
    assert not missing, f"{module}.__all__ names what it does not hold: {missing}"


def test_modules_import_each_other_through_their_interfaces() -> None:
    """A public module's names that other modules import are in its ``__all__``; no private name
    (``_x``) is imported from another module, except from the ``_capture`` package itself."""
    wrong = []
    for module, path in MODULES.items():
        for src, name, line in _imports(path, top_level=False):
            if not name or _target(src, name) != src:
                continue  # a module imported as a whole
            where = f"{path.relative_to(ROOT.parent)}:{line} {src}.{name}"
            if name.startswith("_") and not name.startswith("__") and src != "splinelens._capture":
                wrong.append(f"{where} (private)")
            elif src in PUBLIC and src != module and name not in [*_interface(src), "__version__"]:
                wrong.append(f"{where} (not in __all__)")
    assert not wrong


def _interface(module: str) -> list[str]:
    return importlib.import_module(module).__all__


def test_module_level_imports_form_no_cycle() -> None:
    graph = {
        m: {_target(s, n) for s, n, _ in _imports(p, top_level=True)} & set(MODULES)
        for m, p in MODULES.items()
    }
    for m in graph:  # a package's own __init__ is imported with any of its modules
        graph[m].discard(m)
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        if state.get(m) == 2:
            return
        assert state.get(m) != 1, "import cycle: " + " -> ".join([*path, m])
        state[m] = 1
        for dep in sorted(graph[m]):
            if not (m.startswith(dep + ".")):  # (a module's package is not a dependency)
                visit(dep, [*path, m])
        state[m] = 2

    for m in sorted(graph):
        visit(m, [])


def _layer(module: str) -> str:
    for part in ("paper", "geometry", "smooth"):
        if module.startswith(f"splinelens.{part}"):
            return part
    return "cli" if module == "splinelens.cli" else "top" if module == "splinelens" else "core"


ALLOWED = {  # layer -> layers its module-level imports may read
    "core": {"core"},
    "smooth": {"core", "smooth"},
    "geometry": {"core", "geometry"},
    "paper": {"core", "geometry", "smooth", "paper", "top"},
    "cli": {"core", "top"},
    "top": {"core", "geometry", "smooth", "top"},
}


def test_arrows_point_one_way() -> None:
    """The core never imports geometry, smooth or the paper; geometry never the paper; only the
    CLI reads the paper, and only inside its functions."""
    wrong = []
    for module, path in MODULES.items():
        for src, name, line in _imports(path, top_level=True):
            dep = _layer(_target(src, name))
            if dep not in ALLOWED[_layer(module)]:
                wrong.append(f"{path.relative_to(ROOT.parent)}:{line} imports {src}")
    assert not wrong
