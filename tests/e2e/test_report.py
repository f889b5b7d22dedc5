"""The PR report (stages/report.py) between two commits of a tiny DVC repository: the changed
param, both values of each changed metric (headline first), one PNG per changed plot, both
versions of a changed figure, nothing for what did not change. And the CI workflow that posts
it passes actionlint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.e2e

DVC_YAML = {
    "metrics": ["reports/evaluate_multi/metrics.json"],
    "plots": [
        {"loss": {"x": "step", "y": {"curves/loss.json": "loss"}}},
        {"steady": {"x": "step", "y": {"curves/steady.json": "value"}}},
        "figures",
    ],
}


def env() -> dict:
    return dict(os.environ, DVC_NO_ANALYTICS="1", PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")


def sh(cwd: Path, *args: str) -> str:
    done = subprocess.run(args, cwd=cwd, env=env(), capture_output=True, text=True)
    assert done.returncode == 0, f"{args}: {done.stdout}{done.stderr}"
    return done.stdout


def write_revision(root: Path, lr: float, metrics: dict, losses: list[float], colour: str):
    (root / "params.yaml").write_text(yaml.safe_dump({"train": {"lr": lr, "epochs": 3}}))
    (root / "reports/evaluate_multi").mkdir(parents=True, exist_ok=True)
    (root / "reports/evaluate_multi/metrics.json").write_text(json.dumps(metrics))
    (root / "curves").mkdir(exist_ok=True)
    rows = [{"step": i, "loss": v} for i, v in enumerate(losses)]
    (root / "curves/loss.json").write_text(json.dumps(rows))
    steady = [{"step": i, "value": i * i} for i in range(3)]
    (root / "curves/steady.json").write_text(json.dumps(steady))
    (root / "figures").mkdir(exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(root / "figures/changing.png")
    Image.new("RGB", (8, 8), "white").save(root / "figures/same.png")


@pytest.fixture
def tiny_repo(tmp_path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    sh(root, "git", "init", "-q", "-b", "main")
    sh(root, "git", "config", "user.email", "t@example.com")
    sh(root, "git", "config", "user.name", "t")
    sh(root, "dvc", "init", "-q")
    (root / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    base = {"detections_per_image": 9.0, "map": 0.25, "images": 10, "overlap": "voc"}
    write_revision(root, 0.1, base, [1.0, 0.8, 0.7], "red")
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-q", "-m", "baseline")
    sh(root, "git", "branch", "team/base")  # a base with a slash, as origin/main in CI
    change = {"detections_per_image": 7.5, "map": 0.5, "images": 10, "overlap": "voc"}
    write_revision(root, 0.2, change, [1.0, 0.6, 0.4], "blue")
    return root


def test_report_shows_what_changed_and_only_that(tiny_repo):
    sh(tiny_repo, sys.executable, "-m", "stages.report", "--base", "team/base", "--out", "review")
    out = tiny_repo / "review"
    text = (out / "report.md").read_text()
    assert "| file | param | team/base | workspace |" in text
    assert "| params.yaml | train.lr | 0.1 | 0.2 |" in text
    assert "train.epochs" not in text  # unchanged param
    assert "| **map** | 0.25 | 0.5 | +0.25 |" in text
    assert "| detections_per_image | 9 | 7.5 | -1.5 |" in text
    assert text.index("**map**") < text.index("detections_per_image")  # headline first
    assert "images" not in text.split("## Metrics")[1].split("## Plots")[0]  # unchanged
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["loss.png"]
    with Image.open(out / "plots/loss.png") as png:
        assert png.width > 400 and png.getextrema() != ((0, 0),) * len(png.getbands())
    assert "![loss](plots/loss.png)" in text
    figures = sorted(p.name for p in (out / "figures").iterdir())
    assert figures == ["team_base_figures_changing.png", "workspace_figures_changing.png"]
    with Image.open(out / "figures/team_base_figures_changing.png") as old:
        assert old.getpixel((0, 0)) == (255, 0, 0)
    with Image.open(out / "figures/workspace_figures_changing.png") as new:
        assert new.getpixel((0, 0)) == (0, 0, 255)
    assert "(figures/team_base_figures_changing.png)" in text and "same.png" not in text
    page = (out / "report.html").read_text()
    assert "<table>" in page and '<img src="plots/loss.png"' in page and "<td>0.2</td>" in page


def test_report_of_an_unchanged_workspace_says_so(tiny_repo):
    sh(tiny_repo, "git", "add", "-A")
    sh(tiny_repo, "git", "commit", "-q", "-m", "change")
    sh(tiny_repo, sys.executable, "-m", "stages.report", "--base", "HEAD")
    text = (tiny_repo / "report/report.md").read_text()
    for line in ("No param changed.", "No metric changed.", "No plot data changed."):
        assert line in text
    assert "No figure changed." in text


def test_report_names_an_unknown_base_revision(tiny_repo):
    done = subprocess.run(
        [sys.executable, "-m", "stages.report", "--base", "no-such-branch"],
        cwd=tiny_repo,
        env=env(),
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0
    assert "no-such-branch" in done.stderr and "Traceback" not in done.stderr
    assert not (tiny_repo / "report").exists()  # nothing half-written


def test_the_pr_workflow_passes_actionlint():
    actionlint = shutil.which("actionlint", path=str(BIN)) or shutil.which("actionlint")
    assert actionlint, "actionlint is a dev dependency (pyproject.toml): make install"
    workflows = sorted((REPO / ".github/workflows").glob("*.y*ml"))
    assert workflows
    done = subprocess.run(
        [actionlint, "-no-color", *map(str, workflows)], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
