"""The package's import layers: no module imports one from a higher layer, and no imports go in a circle.

Every import counts: at the top, inside functions (the lazy ones) and under ``TYPE_CHECKING``.
A module may import modules of its own layer or of lower ones. ``treeview`` and ``frames`` are pure
(no widgets, no sockets), with ``render`` in the third layer: they build on the model's types.
``media`` (what can be shared, checked bytes) sits beside the model, which uses it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import zchat_nb

PACKAGE = Path(zchat_nb.__file__).resolve().parent

LAYERS: list[set[str]] = [
    {"exceptions", "seed", "amend"},
    {"model", "security", "net", "netthread", "events", "storage", "media", "pickles", "ratelog"},
    {"server", "render", "certs", "treeview", "frames", "pgwake", "signing", "blobguard", "guard"},
    {"local", "client"},
    {"widget", "inspector", "teacher", "terminal", "demo"},
    {"cli"},
    {"magics"},
    {"__init__", "__main__"},
]
LAYER = {module: level for level, modules in enumerate(LAYERS) for module in modules}


def imports_of(source: str) -> set[str]:
    """The zchat_nb modules that ``source`` imports, anywhere in it."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 or node.module == "zchat_nb" or (node.module or "").startswith("zchat_nb."):
                module = node.module or ""
                base = (module if node.level == 1 else module.removeprefix("zchat_nb")).lstrip(".")
                if base:
                    found.add(base.split(".")[0])
                else:  # from . import x, from zchat_nb import x: modules among the names
                    found |= {alias.name for alias in node.names if (PACKAGE / f"{alias.name}.py").exists()}
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("zchat_nb."):
                    found.add(alias.name.split(".")[1])
    return found


def graph() -> dict[str, set[str]]:
    return {
        path.stem: imports_of(path.read_text(encoding="utf-8")) - {path.stem}
        for path in sorted(PACKAGE.glob("*.py"))
    }


def test_the_parser_sees_every_kind_of_import() -> None:
    source = (
        "from .model import Room\n"
        "from . import render\n"
        "import zchat_nb.net\n"
        "from zchat_nb.local import data_dir\n"
        "if TYPE_CHECKING:\n    from .client import ChatClient\n"
        "def later():\n    from .widget import ChatWidget\n"
        "import os\nfrom typing import Any\n"
    )
    assert imports_of(source) == {"model", "render", "net", "local", "client", "widget"}


def test_every_module_has_a_layer() -> None:
    assert set(graph()) <= set(LAYER), sorted(set(graph()) - set(LAYER))


@pytest.mark.parametrize("module", sorted(LAYER))
def test_no_module_imports_from_a_higher_layer(module: str) -> None:
    imports = graph().get(module, set())
    higher = sorted(name for name in imports if LAYER.get(name, len(LAYERS)) > LAYER[module])
    assert not higher, f"zchat_nb.{module} (layer {LAYER[module]}) imports {higher} from above"


def test_no_imports_go_in_a_circle() -> None:
    edges = graph()
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycle = [*path[path.index(module) :], module]
            raise AssertionError("import circle: " + " -> ".join(cycle))
        if module in done:
            return
        for imported in sorted(edges.get(module, ())):
            visit(imported, [*path, module])
        done.add(module)

    for module in sorted(edges):
        visit(module, [])


def test_the_readme_layout_names_every_module_in_its_layer() -> None:
    readme = (PACKAGE.parent / "README.md").read_text(encoding="utf-8")
    layout = readme[readme.index("## Layout") :]
    rows = {
        module: int(layer) for layer, module in re.findall(r"^\| (\d) \| `(\w+)`", layout, flags=re.MULTILINE)
    }
    expected = {module: level for module, level in LAYER.items() if not module.startswith("__")}
    assert rows == expected
