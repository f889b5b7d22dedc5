"""The library's packages are floors (pipeline_lib/__init__.py lists them): a module imports from
its own package and from lower floors only, the modules form no circle, and every package says in
its docstring what each of its modules holds. Read from the source, so a new import that runs up
or sideways fails here."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from test_dvc_yaml import imported_modules

import pipeline_lib

LIBRARY = Path(pipeline_lib.__file__).parent
FLOOR_LINE = re.compile(r"^\s+(\d+)\s+([a-z_]+)\s+\S", re.M)


def floors() -> dict[str, int]:
    """{package: floor} as pipeline_lib's docstring lists them."""
    return {name: int(floor) for floor, name in FLOOR_LINE.findall(pipeline_lib.__doc__)}


def library_modules() -> dict[str, Path]:
    """{"models.heads": path} for every module of every package."""
    return {
        f"{path.parent.name}.{path.stem}": path
        for path in LIBRARY.glob("*/*.py")
        if path.name != "__init__.py"
    }


def imports_of(path: Path) -> set[str]:
    """The library modules `path` imports ("models.heads"), at the top or inside functions, as
    test_dvc_yaml reads them."""
    parts = (module.split(".") for module in imported_modules(path))
    return {".".join(p[1:3]) for p in parts if p[0] == "pipeline_lib" and len(p) >= 3}


def test_every_package_has_a_floor_and_no_module_sits_outside_the_packages():
    packages = {path.parent.name for path in LIBRARY.glob("*/__init__.py")}
    assert packages == set(floors()), "pipeline_lib's docstring lists other packages than exist"
    assert [p.name for p in LIBRARY.glob("*.py")] == ["__init__.py"]
    assert set(floors().values()) == set(range(max(floors().values()) + 1))  # no floor skipped


def test_imports_stay_in_their_package_or_go_down():
    floor, modules = floors(), library_modules()
    wrong = []
    for name, path in sorted(modules.items()):
        package = name.split(".")[0]
        for imported in sorted(imports_of(path)):
            assert imported in modules, f"{path}: imports {imported}, which does not exist"
            other = imported.split(".")[0]
            if other != package and floor[other] >= floor[package]:
                wrong.append(f"{name} (floor {floor[package]}) imports {imported} ({floor[other]})")
    assert not wrong, "imports running up or sideways:\n" + "\n".join(wrong)


def test_no_circle_among_modules():
    modules = library_modules()
    graph = {name: imports_of(path) - {name} for name, path in modules.items()}
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, "import circle: " + " -> ".join((*path, name))
        if name not in done:
            for imported in graph[name]:
                visit(imported, (*path, name))
            done.add(name)

    for name in graph:
        visit(name, ())


def test_each_package_docstring_names_each_of_its_modules():
    for init in LIBRARY.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc, f"{init} has no docstring saying what belongs in its package"
        for module in init.parent.glob("*.py"):
            if module.name != "__init__.py":
                assert f"`{module.stem}`" in doc, f"{init}'s docstring does not name {module.stem}"


def test_imports_are_read_in_each_form(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text(
        "from pipeline_lib.models import heads\n"
        "import pipeline_lib.base.params\n"
        "def f():\n    from pipeline_lib.training.loop import fit\n"
        "import torch.nn\n"
    )
    assert imports_of(path) == {"models.heads", "base.params", "training.loop"}
