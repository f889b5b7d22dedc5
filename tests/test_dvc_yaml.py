"""dvc.yaml declares exactly the code each stage runs, so DVC re-runs a stage when (and only when)
code it imports changes. The imports are read from the source, not listed by hand here."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml
from test_docs import leaf_keys

REPO = Path(__file__).resolve().parents[1]
SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross")  # params.yaml's classes
LOCAL_PACKAGES = ("stages", "pipeline_lib")


def module_file(module: str) -> Path | None:
    """stages.train -> stages/train.py (None for anything outside this repository)."""
    if module.split(".")[0] not in LOCAL_PACKAGES:
        return None
    path = REPO / Path(*module.split("."))
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    raise AssertionError(f"import of {module!r} names no file in the repository")


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside functions (`from pkg import mod` too)."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
            for alias in node.names:  # `from pipeline_lib import plots` imports a module
                candidate = f"{node.module}.{alias.name}"
                if (REPO / Path(*candidate.split("."))).with_suffix(".py").is_file():
                    modules.add(candidate)
    return modules


def code_closure(module: str) -> set[str]:
    """The repository files that running `python -m module` executes, as relative paths."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        path = module_file(todo.pop())
        if path is None or path in seen:
            continue
        seen.add(path)
        todo.extend(imported_modules(path))
    return {path.relative_to(REPO).as_posix() for path in seen if not only_a_docstring(path)}


def only_a_docstring(path: Path) -> bool:
    """A package marker holding nothing but its docstring (or nothing): no code to re-run for."""
    body = ast.parse(path.read_text(), filename=str(path)).body
    return path.name == "__init__.py" and all(
        isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in body
    )


def test_every_stage_lists_exactly_the_code_it_imports():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        command = stage["cmd"].split()
        assert command[:2] == ["python", "-m"], f"{name}: cmd is not `python -m stages.<script>`"
        assert command[2].startswith("stages."), f"{name}: {command[2]} is not a stage script"
        assert module_file(command[2]) is not None
        declared = {dep for dep in stage["deps"] if dep.endswith(".py")}
        assert declared == code_closure(command[2]), (
            f"stage {name}: dvc.yaml deps differ from the imports of {command[2]}: "
            f"missing {sorted(code_closure(command[2]) - declared)}, "
            f"not imported {sorted(declared - code_closure(command[2]))}"
        )


def test_the_closure_follows_imports_inside_functions_and_packages():
    closure = code_closure("stages.prepare")
    assert "pipeline_lib/reporting/plots.py" in closure  # `from pipeline_lib import plots`
    assert "pipeline_lib/base/errors.py" in closure  # imported by stages/common.py only indirectly
    assert "pipeline_lib/data/synthetic.py" not in closure


def test_dvc_exp_run_s_rewrites_only_the_key_it_sets(tmp_path):
    """`dvc exp run -S` writes params.yaml back through DVC's own YAML round trip
    (`dvc.utils.hydra.apply_overrides`): our file must come back as it was but for that value,
    so that an experiment's diff shows its change and nothing else."""
    from dvc.utils.hydra import apply_overrides

    copy = tmp_path / "params.yaml"
    original = (REPO / "params.yaml").read_text()
    copy.write_text(original)
    apply_overrides(str(copy), ["head.dropout=0.3", "data.synthetic.classes=[circle,star]"])
    six = "".join(f"    - {name}\n" for name in SHAPES)
    assert six in original and original.count("  dropout: 0.0 ") == 1
    expected = original.replace(six, "    - circle\n    - star\n")
    assert copy.read_text() == expected.replace("  dropout: 0.0 ", "  dropout: 0.3 ")


def test_every_key_of_params_yaml_reruns_a_stage():
    """DVC re-runs a stage for the params it lists (a key, or a whole group): a key that no stage
    lists would change nothing under `dvc exp run -S key=value`."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    declared = {p for stage in stages.values() for p in stage.get("params", [])}

    def listed(key: str) -> bool:
        parts = key.split(".")
        return any(".".join(parts[:n]) in declared for n in range(1, len(parts) + 1))

    keys = leaf_keys(yaml.safe_load((REPO / "params.yaml").read_text()))
    assert sorted(k for k in keys if not listed(k)) == []
