"""The ``triows`` package imports its own modules one way only: no import circle.

The graph is read from the source with :mod:`ast`, so every import counts:
module level, inside functions, and under ``if TYPE_CHECKING:`` (a circle of
annotations still ties the modules' reading together).
"""

import ast
from pathlib import Path

import triows

PACKAGE_DIR = Path(triows.__file__).parent


def module_names(package_dir: Path) -> dict[str, Path]:
    """Every module of the package under ``package_dir``, by dotted name."""
    package = package_dir.name
    modules: dict[str, Path] = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = [package, *path.relative_to(package_dir).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that the module ``name`` (read from ``path``) imports anywhere."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules:
                    found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            for alias in node.names:
                # ``from triows import sse`` names a module; ``from triows.x import y`` a name in x.
                submodule = f"{source}.{alias.name}"
                if submodule in modules:
                    found.add(submodule)
                elif source in modules:
                    found.add(source)
    found.discard(name)
    return found


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    modules = module_names(package_dir)
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as the path around it (first module repeated at the end), or None."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(module: str) -> list[str] | None:
        path.append(module)
        on_path.add(module)
        for imported in sorted(graph[module]):
            if imported in on_path:
                return [*path[path.index(imported) :], imported]
            if imported not in done:
                cycle = visit(imported)
                if cycle is not None:
                    return cycle
        path.pop()
        on_path.discard(module)
        done.add(module)
        return None

    for module in sorted(graph):
        if module not in done:
            cycle = visit(module)
            if cycle is not None:
                return cycle
    return None


def test_the_triows_package_has_no_import_circle() -> None:
    graph = import_graph(PACKAGE_DIR)
    assert "triows.dataplane" in graph and graph["triows.app"], "the graph was not read"
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_the_data_plane_and_the_event_stream_do_not_import_the_app() -> None:
    graph = import_graph(PACKAGE_DIR)
    assert "triows.dataplane" in graph["triows.app"]
    assert "triows.sse" in graph["triows.dataplane"]
    assert "triows.app" not in graph["triows.dataplane"] | graph["triows.sse"]
    assert "triows.dataplane" not in graph["triows.sse"]


def test_a_circle_through_a_function_level_or_type_checking_import_is_found(
    tmp_path: Path,
) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg import b\n")
    (package / "b.py").write_text("def f():\n    from .c import thing\n")
    (package / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.a\n"
    )
    (package / "d.py").write_text("from pkg.a import name\n")
    assert find_cycle(import_graph(package)) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]


def test_a_package_whose_imports_run_one_way_has_no_circle(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg import b, c\n")
    (package / "b.py").write_text("from pkg.c import thing\n")
    (package / "c.py").write_text("import json\n")
    assert import_graph(package)["pkg.a"] == {"pkg.b", "pkg.c"}
    assert find_cycle(import_graph(package)) is None
