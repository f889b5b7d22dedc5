"""The PR report (stages/report.py) between two commits of a tiny DVC repository: the changed
param, both values of each changed metric (headline first), one PNG per changed plot, both
versions of a changed figure, nothing for what did not change; with per-image records on both
sides (DVC-tracked), the judged headline figures, the error types and the images moved, and a
base without records reported plainly. And the CI workflow that posts it passes actionlint."""

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
from test_metrics import image
from test_records import records_of

from pipeline_lib.measures.records import write_records

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


def report(cwd: Path, base: str) -> subprocess.CompletedProcess:
    """`python -m stages.report --base BASE` in `cwd`, whatever its exit status."""
    command = [sys.executable, "-m", "stages.report", "--base", base]
    return subprocess.run(command, cwd=cwd, env=env(), capture_output=True, text=True)


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
    done = report(tiny_repo, "no-such-branch")
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


BOX = [10, 10, 60, 60]


def write_records_revision(root: Path, found: bool) -> None:
    """Per-image records of evaluate_multi, tracked by DVC (`dvc add`) as the pipeline's are:
    eight images, each with one object at BOX; the detections find it (`found`) or sit beside it
    (IoU 0.36: localisation errors). The photo beside them for the moved images' figures."""
    shifted = [10, 10, 60, 28]
    images = [image([BOX if found else shifted], [0.9], [BOX]) for _ in range(8)]
    records = records_of(images)
    records.dataset_dir = "photos"
    write_records(records, root / "reports/evaluate_multi/records")
    (root / "photos").mkdir(exist_ok=True)
    Image.new("RGB", (80, 80), "grey").save(root / "photos/p.jpg")
    sh(root, "dvc", "add", "-q", "reports/evaluate_multi/records")


def test_report_judges_headline_figures_from_records(tiny_repo):
    """Base: every object missed by its box (mAP 0); the change finds all eight (mAP 1): better,
    on every draw of the images; the localisation errors gone; the images moved, drawn. Only
    one run a side: the report says the seeds' spread is not covered."""
    sh(tiny_repo, "git", "checkout", "-q", "team/base")
    sh(tiny_repo, "git", "checkout", "-q", "-b", "with-records")
    write_records_revision(tiny_repo, found=False)
    sh(tiny_repo, "git", "add", "-A")
    sh(tiny_repo, "git", "commit", "-q", "-m", "base with records")
    write_records_revision(tiny_repo, found=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())  # eval.bootstrap, confidence
    params["train"]["lr"] = 0.2
    (tiny_repo / "params.yaml").write_text(yaml.safe_dump(params))
    sh(tiny_repo, sys.executable, "-m", "stages.report", "--base", "with-records")
    text = (tiny_repo / "report/report.md").read_text()
    headline = text.split("## Headline figures")[1].split("## Where")[0]
    assert "| reports/evaluate_multi | **map** | 0.0000 | 1.0000 | +1.0000 |" in headline
    assert "+1.0000 … +1.0000 | **better** |" in headline
    assert "**not** the spread between training seeds" in headline
    errors = text.split("## Where the detector errs")[1].split("## Images")[0]
    assert "| localisation | 1.0000 | 0.0000 | -1.0000 | 8 → 0 |" in errors
    assert "One run a side: these costs move with the training seed too" in errors
    moved = text.split("## Images the change moved")[1].split("## Metrics")[0]
    assert "| im0 | 0 → 1 | 1 → 0 | 1 → 0 |" in moved and "![im0](moved/im0.png)" in moved
    assert len(list((tiny_repo / "report/moved").glob("*.png"))) == 4  # MOVED_IMAGES


def test_a_base_without_records_is_said_in_one_line(tiny_repo):
    """team/base predates per-image records: no interval, one line saying so, no traceback; the
    headline figures still in the metrics table."""
    write_records_revision(tiny_repo, found=True)
    done = report(tiny_repo, "team/base")
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    text = (tiny_repo / "report/report.md").read_text()
    headline = text.split("## Headline figures")[1].split("## Metrics")[0].strip().splitlines()
    said = ": its headline figures are in Metrics below, without intervals."
    assert headline == [
        "- `team/base` has no reports/evaluate_multi/records (made before the report could "
        f"judge changes){said}",
        "- `team/base` has no reports/evaluate_single/records (made before the report could "
        f"judge changes){said}",
        f"- the workspace has no reports/evaluate_single/records (`dvc repro` first){said}",
    ]
    assert "| **map** | 0.25 | 0.5 | +0.25 |" in text
