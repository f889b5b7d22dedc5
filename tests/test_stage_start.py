"""A stage's start: the garbage collector off while its imports load, their objects frozen, then
on again for the command (stages/__init__.py, stages/common.main)."""

from __future__ import annotations

import ast
import gc
import subprocess
import sys
from pathlib import Path

from stages import common

REPO = Path(__file__).resolve().parents[1]


def collector_after_importing_stages(argv0: str) -> str:
    """gc.isenabled() in a fresh interpreter that imports the stages package with ARGV0."""
    code = f"import sys; sys.argv[0] = {argv0!r}; import gc, stages; print(gc.isenabled())"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_collector_pauses_only_for_a_stage_run_as_a_program():
    assert collector_after_importing_stages("-m") == "False"  # as `python -m stages.NAME` does
    assert collector_after_importing_stages("notebook.py") == "True"  # imported: nothing changes


def test_main_freezes_what_the_imports_made_and_runs_the_command_with_the_collector_on():
    seen = []
    gc.disable()
    try:
        common.main(lambda: seen.append((gc.isenabled(), gc.get_freeze_count())))
    finally:
        gc.unfreeze()
        gc.enable()
    assert len(seen) == 1
    enabled, frozen = seen[0]
    assert enabled
    assert frozen > 10_000  # this process's modules (pytest, torch): objects by the thousand


def test_every_stage_script_starts_through_common_main():
    """A script calling its app directly would run its whole command without the collector."""
    for script in sorted((REPO / "stages").glob("*.py")):
        tree = ast.parse(script.read_text(), filename=str(script))
        blocks = [
            node
            for node in tree.body
            if isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'"
        ]
        if not blocks:
            continue
        calls = [ast.unparse(statement) for statement in blocks[0].body]
        assert len(calls) == 1 and calls[0].startswith("common.main("), (
            f"{script.name}: its __main__ block must be `common.main(...)`, not {calls}"
        )
