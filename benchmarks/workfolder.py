"""A working folder where benchmarks run the real stages, as `dvc repro` would (no dvc needed).

The stages read `params.yaml` and write `data/`, `models/` and `reports/` relative to the folder
they run in; `write_params` copies the repository's params with some keys changed, `stage` runs
`python -m stages.<name> ...` there and returns its output. `cpu_flags` names the instruction
sets that every speed figure depends on (printed first by each benchmark).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def write_params(folder: Path, changes: dict) -> None:
    """The repository's params.yaml with `changes` ({"group.key": value}) into `folder`."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in changes.items():
        *groups, name = key.split(".")
        node = params
        for group in groups:
            node = node[group]
        node[name] = value
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def stage(folder: Path, *args: str, env: dict | None = None) -> str:
    """Run `python -m stages.<args[0]> <args[1:]>` in `folder`; its stdout, or exit naming it."""
    command = [sys.executable, "-m", f"stages.{args[0]}", *args[1:]]
    env = dict(os.environ, PYTHONPATH=str(REPO)) | (env or {})
    done = subprocess.run(command, cwd=folder, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{' '.join(args)} failed in {folder}:\n{done.stdout}{done.stderr}")
    return done.stdout


def cpu_flags(wanted=("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")) -> str:
    """The `wanted` flags this CPU has (from /proc/cpuinfo), space-separated."""
    flags: set[str] = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return " ".join(flag for flag in wanted if flag in flags) or "unknown"
