"""Faults on the real `dvc` CLI: stages killed mid-run, two runs at once, bad `-S` params, and
determinism. docs/reliability.md lists what each shows."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import built_once, snapshot, tiny_params

REPO = Path(__file__).resolve().parents[2]
# one project for the module, its tests in order (one pytest-xdist process: tests/conftest.py)
pytestmark = pytest.mark.e2e


def environment() -> dict:
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def dvc(cwd: Path, *args: str, ok: bool = True) -> str:
    done = subprocess.run(
        ["dvc", *args], cwd=cwd, env=environment(), capture_output=True, text=True, timeout=600
    )
    output = done.stdout + done.stderr
    assert (done.returncode == 0) == ok, f"dvc {' '.join(args)} (exit {done.returncode}):\n{output}"
    return output


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, dict]:
    """A committed tiny pipeline run once: (folder, its snapshot)."""
    built_once(tmp_path_factory, "test_faults")
    root = tmp_path_factory.mktemp("faults")
    for name in ("stages", "pipeline_lib"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root)
    # enough images and epochs that extract and training can be caught mid-run
    params = tiny_params(yaml.safe_load((REPO / "params.yaml").read_text()), 48, 8, epochs=20)
    params["image"]["size"], params["grid"]["num_cells"] = 224, 7  # as when these were timed
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for args in (
        ["init", "-q", "-b", "main"],
        ["config", "user.email", "t@example.com"],
        ["config", "user.name", "t"],
    ):
        subprocess.run(["git", *args], cwd=root, check=True)
    dvc(root, "init", "-q")
    for message in ("pipeline", "baseline"):  # dvclive needs a commit; then commit its results
        if message == "baseline":
            dvc(root, "repro")
        subprocess.run(["git", "add", "-A"], cwd=root, check=True)
        subprocess.run(["git", "commit", "-qm", message], cwd=root, check=True)
    return root, snapshot(root)


# Runs `dvc` with Ctrl-C's default action restored. A shell starts background commands (`make
# test &`, nohup) with SIGINT ignored, every child inherits that, and Python keeps an inherited
# "ignored": then no Ctrl-C would reach the stage and `dvc repro` would finish with exit 0.
DEFAULT_SIGINT = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execvp(sys.argv[1], sys.argv[1:])"
)


def start(root: Path, *args: str) -> subprocess.Popen:
    """`dvc ...` in its own process group, Ctrl-C with its default action (as a terminal runs
    it), output to a file."""
    log = open(root / "run.log", "w")  # noqa: SIM115 (closed by the caller via the process)
    return subprocess.Popen(
        [sys.executable, "-c", DEFAULT_SIGINT, "dvc", *args],
        cwd=root,
        env=environment(),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_for(process: subprocess.Popen, ready, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, f"finished before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.02)


def rows(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.is_file() else 0


@pytest.mark.parametrize(
    ("stage", "sig"),
    [
        ("extract", signal.SIGINT),
        ("extract", signal.SIGKILL),
        ("train_single", signal.SIGINT),
        ("train_multi", signal.SIGKILL),
    ],
    ids=lambda value: value.name if isinstance(value, signal.Signals) else value,
)
def test_a_stage_killed_mid_run_is_redone_and_gives_the_same_results(project, stage, sig):
    root, baseline = project
    if stage == "extract":  # features being streamed, in the folder that replaces data/features
        ready = lambda: any(root.glob("data/.features*/.train.safetensors.rank0.rows.tmp"))  # noqa: E731
    else:  # at least two epochs logged by dvclive
        marker = root / f"reports/{stage}/plots/metrics/train/loss.tsv"
        marker.unlink()
        ready = lambda: rows(marker) >= 3  # noqa: E731 (header + 2 epochs)
    process = start(root, "repro", "-f", "-s", stage)
    wait_for(process, ready, f"{stage} at work")
    os.killpg(process.pid, sig)  # Ctrl-C reaches the whole group; SIGKILL leaves no chance
    assert process.wait(timeout=60) != 0

    output = dvc(root, "repro")  # no manual clean-up
    assert f"Running stage '{stage}'" in output, output
    assert snapshot(root) == baseline  # identical outputs and metrics: nothing partial was kept
    assert dvc(root, "status").strip().endswith("Data and pipelines are up to date.")


def test_a_second_repro_is_refused_while_one_runs(project):
    root, baseline = project
    marker = root / "reports/train_multi/plots/metrics/train/loss.tsv"
    marker.unlink()
    first = start(root, "repro", "-f", "-s", "train_multi")
    wait_for(first, lambda: rows(marker) >= 2, "training")
    output = dvc(root, "repro", ok=False)
    assert "is busy, it is being blocked by" in output, output  # DVC's lock on what stages use
    assert "dvc repro -f -s train_multi" in output  # ... naming the run that holds it
    assert first.wait(timeout=300) == 0, (root / "run.log").read_text()
    assert snapshot(root) == baseline


def test_bad_params_given_with_s_fail_before_any_work_naming_the_key(project):
    root, baseline = project
    for setting, words in (
        ("train.epochs=-3", "params.yaml: train.epochs: Input should be greater than 0 (got -3)"),
        ("head.dropout=abc", "params.yaml: head.dropout"),
        ("backbone.name=resnet9", "params.yaml: backbone.name"),
    ):
        output = dvc(root, "exp", "run", "-S", setting, ok=False)
        assert words in output, output
        assert "Traceback" not in output
        # DVC removed the failed stage's outputs before running it: git has the committed
        # params and reports, DVC's cache the models
        subprocess.run(["git", "checkout", "-q", "--", "."], cwd=root, check=True)
        dvc(root, "checkout", "-q", "--force")
        assert snapshot(root) == baseline
