"""How featx's modules import each other: read from the source with ``ast``, imports inside functions
included (they run too, only later), those under ``if TYPE_CHECKING:`` left out (they never run).

Data flows one way: no two modules import each other, however indirectly, and nothing inside the package
imports the ``featx`` package itself, which imports the public API lazily and so sits above every module
(``featx.__version__`` is ``featx._version``'s).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "featx"
# the modules allowed to import the `featx` package itself: the package (its lazy table names modules in
# strings, not imports) and `python -m featx`, which runs the command on top of everything
ABOVE_THE_PACKAGE = {"featx", "featx.__main__"}


def module_name(path: Path, package: Path = PACKAGE) -> str:
    """``featx/extraction/run.py`` -> ``featx.extraction.run``; a package's ``__init__.py`` is the package."""
    parts = [package.name, *path.relative_to(package).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def featx_imports(source: str, module: str, modules: set[str]) -> set[str]:
    """The featx modules ``source`` (the text of ``module``) imports: ``from featx.extract import writer``
    imports the module ``featx.extract.writer``, ``from featx.errors import FeatxError`` the module
    ``featx.errors``, ``from featx import __version__`` the package ``featx``."""
    package = module if module in modules and _is_package(module, modules) else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(_known(alias.name, modules) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from ..cut import CutPath
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                found.add(_known(f"{base}.{alias.name}", modules))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    found.discard("")
    return found


def _is_package(module: str, modules: set[str]) -> bool:
    return any(other.startswith(module + ".") for other in modules)


def _known(dotted: str, modules: set[str]) -> str:
    """The longest prefix of ``dotted`` that is a featx module ("" for anything else)."""
    while dotted and dotted not in modules:
        dotted = dotted.rpartition(".")[0]
    return dotted


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Every module of ``package`` -> the featx modules it imports (itself left out)."""
    files = {module_name(path, package): path for path in sorted(package.rglob("*.py"))}
    modules = set(files)
    return {
        name: featx_imports(path.read_text(encoding="utf-8"), name, modules) - {name}
        for name, path in files.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other (strongly connected components of two or more),
    each sorted; Tarjan's algorithm."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return sorted(found)


def test_featx_modules_import_each_other_without_a_cycle():
    found = cycles(import_graph())
    assert found == [], "modules that import each other: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_module_inside_the_package_imports_the_featx_package():
    graph = import_graph()
    upward = sorted(name for name, imported in graph.items() if "featx" in imported)
    assert [name for name in upward if name not in ABOVE_THE_PACKAGE] == []


def test_every_module_imports_as_a_module_and_no_module_shares_a_name_with_a_public_function():
    """``import featx.verification as v`` is the module; ``featx.verify`` stays the function."""
    import importlib
    import types

    import featx

    for name in sorted(set(import_graph()) - {"featx"}):
        module = importlib.import_module(name)
        assert isinstance(module, types.ModuleType), name
        parent, _, leaf = name.rpartition(".")
        assert isinstance(getattr(sys.modules[parent], leaf), types.ModuleType), (
            f"{name} is shadowed in {parent}"
        )
    clashes = sorted(name for name in featx.__all__ if f"featx.{name}" in import_graph())
    assert clashes == [], f"public names that are also module names: {clashes}"
    assert callable(featx.verify) and callable(featx.truncate) and callable(featx.extract)


# The reader above, held to what it must see: a test that reads nothing would pass.
MODULES = {"featx", "featx.cut", "featx.glue", "featx.report", "featx.extract", "featx.extract.writer"}


def test_an_import_inside_a_function_is_an_import():
    source = "def keep(model):\n    from featx.glue import keep_glue\n    return keep_glue(model)\n"
    assert featx_imports(source, "featx.cut", MODULES) == {"featx.glue"}


def test_an_import_under_type_checking_is_not_an_import_but_its_else_branch_is():
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from featx.report import Report\n"
        "else:\n    from featx.glue import KeepGlue\n"
    )
    assert featx_imports(source, "featx.cut", MODULES) == {"featx.glue"}


def test_a_submodule_imported_from_its_package_is_that_module_and_a_name_is_its_module():
    source = "from featx.extract import writer\nfrom featx import __version__\nimport torch\n"
    assert featx_imports(source, "featx.cut", MODULES) == {"featx.extract.writer", "featx"}


def test_a_relative_import_resolves_against_the_importing_package():
    source = "from . import writer\nfrom ..cut import CutPath\n"
    assert featx_imports(source, "featx.extract.features", MODULES) == {"featx.extract.writer", "featx.cut"}


def test_modules_importing_each_other_through_a_third_are_one_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
