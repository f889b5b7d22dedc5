"""Seconds per epoch of each head kind, side by side, and the time of an experiment run.

    .venv/bin/python benchmarks/heads.py [--work FOLDER] [--epochs 3] [--exp]

On the synthetic default (800 train / 200 val images) in a working folder: features at 224 (7x7
maps of Lite0's 1280-channel head conv, the lab's setting), the same layer at 448, and the
default's (448: 14x14 maps of its 320-channel last block) are extracted once, then every head
kind trains `--epochs` epochs with the real `train` stage and the stage's own s/epoch is printed,
one line per kind, all in this one run (compare only figures of one run: CPUs differ). With
`--exp`, also `dvc exp run --temp -S head.dropout=0.3` in this repository (its committed default
chain must be in the DVC cache, e.g. after `make repro`): the wall time of the whole experiment,
training and evaluating both heads. The CPU's flags are printed first.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import typer
from workfolder import REPO, cpu_flags, stage, write_params

LAB = {
    "head.dropout": 0.5,
    "train.lr_schedule": "constant",
    "train.monitor": "box_loss_plus_error",
    "train.box_loss": "smooth_l1",
    "train.obj_loss": "bce",
    "train.obj_target": "binary",
    "grid.assign": "centre",
    "grid.num_cells": 7,
}
FEATURES = {
    "lab": {"image.size": 224, "backbone.layer": "head"},
    "448 head": {"backbone.layer": "head"},  # the default's size, Lite0's 1280-channel layer
    "default": {},
}
KINDS = {  # name -> (features, stage command, params)
    "single, lab MLP (224)": ("lab", "single", {**LAB, "head.single_kind": "lab"}),
    "single, spatial (448, head layer)": ("448 head", "single", {}),
    "single, spatial (448, default)": ("default", "single", {}),
    "grid, lab 1x1 (224)": ("lab", "multi", {**LAB, "head.grid_kind": "lab"}),
    "grid, conv (448, head layer)": ("448 head", "multi", {}),
    "grid, conv (448, default)": ("default", "multi", {}),
}


def main(work: Path = Path("/tmp/bench_heads"), epochs: int = 3, exp: bool = False) -> None:
    print(f"CPU flags: {cpu_flags()}", flush=True)
    for setting, changes in FEATURES.items():
        folder = work / setting
        if not (folder / "data/features/val.safetensors").is_file():
            write_params(folder, changes)
            for name in ("synthesize", "prepare", "extract"):
                stage(folder, name)
    for name, (setting, kind, changes) in KINDS.items():
        folder = work / setting
        write_params(folder, {**FEATURES[setting], "train.epochs": epochs, **changes})
        line = stage(folder, "train", kind, "--no-progress").splitlines()[-1]
        seconds = re.search(r"([\d.]+) s/epoch", line).group(1)
        print(f"{name:32s} {seconds:>6s} s/epoch", flush=True)
    if exp:
        start = time.perf_counter()
        command = ["dvc", "exp", "run", "--temp", "-S", "head.dropout=0.3"]
        subprocess.run(command, cwd=REPO, check=True, capture_output=True)
        print(f"dvc exp run -S head.dropout=0.3: {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    typer.run(main)
