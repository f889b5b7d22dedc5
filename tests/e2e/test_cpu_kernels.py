"""Head training gives the same model bits on every x86-64 CPU (train.cpu_kernels: avx2).

A machine's CPU kernels are what ATen and oneDNN choose from its instruction set; here each run
is a fresh `python -m stages.train multi` process whose dispatch settings say which machine it
plays: an AVX-512 machine (nothing set, where this CPU has AVX-512), an AVX2-only one (both capped
at AVX2) or an older one (no vector kernels, SSE4.1 convolutions).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline_lib.training.loop import pin_cpu_kernels

pytestmark = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64") or not torch.cpu._is_avx2_supported(),
    reason="CPU kernel dispatch settings are x86-64 ones (and the pin needs AVX2)",
)
KNOBS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")
THIS_MACHINE: dict[str, str] = {}
AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
OLDER = {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"}


def train_multi(trained: Path, tmp: Path, cpu_kernels: str, machine: dict) -> tuple[str, str]:
    """(sha256 of the grid head file, the kernels the run reports) of one training process."""
    folder = tmp / f"{cpu_kernels}-{machine.get('ATEN_CPU_CAPABILITY', 'native')}"
    for name in ("data/prepared", "data/features"):
        shutil.copytree(trained / name, folder / name)
    params = yaml.safe_load((trained / "params.yaml").read_text())
    params["train"]["cpu_kernels"] = cpu_kernels
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    env = {k: v for k, v in os.environ.items() if k not in KNOBS} | machine
    done = subprocess.run(
        [sys.executable, "-m", "stages.train", "multi", "--no-progress"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "warning" not in done.stderr, done.stderr
    digest = hashlib.sha256((folder / "models/multi.safetensors").read_bytes()).hexdigest()
    metrics = json.loads((folder / "reports/train_multi/metrics.json").read_text())
    return digest, metrics["cpu_kernels"]


def test_every_machine_trains_the_same_model_with_the_kernels_pinned(trained, tmp_path):
    pinned_here = train_multi(trained, tmp_path, "avx2", THIS_MACHINE)
    pinned_older = train_multi(trained, tmp_path, "avx2", OLDER)
    avx2_machine = train_multi(trained, tmp_path, "native", AVX2_ONLY)
    older_machine = train_multi(trained, tmp_path, "native", OLDER)
    # the pin overrides whatever the process inherited, and computes what an AVX2 machine does
    assert pinned_here == pinned_older == avx2_machine
    assert pinned_here[1] == "AVX2" and older_machine[1] == "DEFAULT"
    # other kernels give other bits: the comparison above is not vacuous
    assert older_machine[0] != pinned_here[0]
    if torch.cpu._is_avx512_supported():  # the case of the issue: an AVX-512 machine, unpinned
        native = train_multi(trained, tmp_path, "native", THIS_MACHINE)
        assert native[1] == "AVX512" and native[0] != pinned_here[0]


def test_native_and_unknown_choices():
    assert pin_cpu_kernels("native") is None  # nothing to do, nothing set
    with pytest.raises(ValueError, match="cpu_kernels must be one of"):
        pin_cpu_kernels("avx512")


def test_a_pin_after_torch_has_computed_is_reported_not_silent(monkeypatch):
    # In this test process torch has long chosen its kernels: the pin cannot take effect unless
    # they already are AVX2, and it says so instead of pretending.
    torch.ones(3).sum()
    for knob in KNOBS:
        monkeypatch.delenv(knob, raising=False)  # restored (or removed again) after the test
    warning = pin_cpu_kernels("avx2")
    if torch.backends.cpu.get_cpu_capability() == "AVX2":
        assert warning is None
    else:
        assert "already chose" in warning and torch.backends.cpu.get_cpu_capability() in warning
