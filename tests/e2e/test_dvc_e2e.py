"""The real `dvc` CLI in a temporary git repository, on a tiny synthetic configuration."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import yaml
from conftest import built_once, run, tiny_params

REPO = Path(__file__).resolve().parents[2]
# one project for the module, its tests in order (one pytest-xdist process: tests/conftest.py)
pytestmark = pytest.mark.e2e
FINETUNE = {"finetune", "evaluate_finetune"}  # opt-in: no-ops here, re-run after train_multi


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A git + DVC repository holding this project's pipeline with tiny params."""
    built_once(tmp_path_factory, "test_dvc_e2e")
    root = tmp_path_factory.mktemp("project")
    for name in ("stages", "pipeline_lib"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root)
    params = tiny_params(yaml.safe_load((REPO / "params.yaml").read_text()))
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(root, "git", "init", "-q", "-b", "main")
    run(root, "git", "config", "user.email", "test@example.com")
    run(root, "git", "config", "user.name", "test")
    run(root, "dvc", "init", "-q")
    shutil.copytree(REPO / ".dvc" / "plots", root / ".dvc" / "plots", dirs_exist_ok=True)
    run(root, "git", "add", "-A")
    run(root, "git", "commit", "-qm", "pipeline")
    return root


def set_param(project: Path, group: str, key: str, value) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params[group][key] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def stages_run(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


def test_repro_runs_everything_then_nothing(project):
    first = run(project, "dvc", "repro")
    everything = {
        "synthesize",
        "prepare",
        "extract",
        "train_single",
        "evaluate_single",
        "train_multi",
        "evaluate_multi",
    } | FINETUNE
    assert stages_run(first) == everything
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert set(lock["stages"]) == everything
    assert (project / "data/features/train.safetensors").is_file()
    assert (project / "data/prepared/images.parquet").is_file()
    assert (project / "models/single.safetensors").is_file()
    assert (project / "models/multi.safetensors").is_file()
    for figure in ("confusion.png", "predictions.png"):
        assert (project / "reports/evaluate_single/figures" / figure).is_file()
    for figure in ("pr_curves.png", "per_class_ap.png", "nms_before_after.png"):
        assert (project / "reports/evaluate_multi/figures" / figure).is_file()
    assert (project / "reports/train_single/plots/metrics/val/box_loss.tsv").is_file()
    metrics = run(project, "dvc", "metrics", "show")
    assert "train.images" in metrics and "val.objects" in metrics
    for key in (
        "accuracy",
        "mean_iou",
        "hit_rate",
        "box_loss",
        "best_epoch",
        "map_11point",
        "coco_map",
        "recall_upper_bound",
        "grid_collisions.val",
    ):
        assert key in metrics

    second = run(project, "dvc", "repro")
    assert "Running stage" not in second
    assert "Data and pipelines are up to date" in second


def test_each_param_group_reruns_only_its_stages(project):
    run(project, "dvc", "repro")
    heads = {"train_single", "evaluate_single", "train_multi", "evaluate_multi"} | FINETUNE
    # read by training only, features stay cached: the trunk of the single head and the towers
    # of the grid head (FCOS), so both models change and both evaluations re-run
    set_param(project, "head", "conv_width", 12)
    set_param(project, "head", "tower_width", 32)
    assert stages_run(run(project, "dvc", "repro")) == heads
    set_param(project, "head", "single_kind", "lab")  # the single head's only
    assert stages_run(run(project, "dvc", "repro")) == {"train_single", "evaluate_single"}
    # grid.* re-runs train_multi only; the default grid head (FCOS) reads no grid.* key, so the
    # model comes out the same bits and nothing after it re-runs
    set_param(project, "grid", "num_cells", 5)
    assert stages_run(run(project, "dvc", "repro")) == {"train_multi"}
    set_param(project, "eval", "nms_iou", 0.4)  # eval.samples would re-run both evaluations
    assert stages_run(run(project, "dvc", "repro")) == {"evaluate_multi", "evaluate_finetune"}
    # (backbone.* re-runs extract and the heads but not prepare: test_experiments_... checks it)
    set_param(project, "image", "size", 160)  # 5x5 feature maps: grid.num_cells is 5 by now
    assert stages_run(run(project, "dvc", "repro")) == {"prepare", "extract"} | heads
    # opting in to fine-tuning runs just its two stages, which now train and measure (on the
    # 160-pixel images: an eighth of the default's backbone work)
    set_param(project, "finetune", "enabled", True)
    set_param(project, "finetune", "epochs", 1)
    set_param(project, "finetune", "batch_size", 4)
    set_param(project, "finetune", "workers", 0)
    assert stages_run(run(project, "dvc", "repro")) == FINETUNE
    compared = json.loads((project / "reports/evaluate_finetune/metrics.json").read_text())
    assert compared["enabled"] and "map_frozen" in compared
    assert (project / "models/finetuned/model.safetensors").is_file()
    set_param(project, "finetune", "enabled", False)
    assert stages_run(run(project, "dvc", "repro")) == FINETUNE


def test_experiments_metrics_diff_and_plots(project):
    """The review workflow: commit a baseline, run an experiment, diff it, render the plots.
    (The baseline is the project as the test before left it: nothing to re-run.)"""
    run(project, "dvc", "repro")
    run(project, "git", "add", "-A")
    run(project, "git", "commit", "-qm", "baseline")
    # the baseline's precision-recall curves, one per class (a 2-epoch head may find nothing at
    # all after a param change, so they are checked here)
    rendered = json.loads(run(project, "dvc", "plots", "show", "--json"))
    pr = rendered["data"]["evaluate_multi_pr_curves"][0]["content"]["data"]["values"]
    assert {"class", "recall", "precision"} <= set(pr[0])

    output = run(project, "dvc", "exp", "run", "-S", "train.lr=0.003", "-n", "lr3")
    assert (
        stages_run(output)
        == {
            "train_single",
            "evaluate_single",
            "train_multi",
            "evaluate_multi",
        }
        | FINETUNE
    )
    shown = run(project, "dvc", "exp", "show", "--no-pager", "--csv")
    assert "lr3" in shown and "map_11point" in shown
    diff = run(project, "dvc", "metrics", "diff")  # workspace (the experiment) against HEAD
    for path in ("reports/train_single/metrics.json", "reports/train_multi/metrics.json"):
        assert path in diff, diff  # the learning rate changes the training losses of both heads
    assert "val.loss" in diff
    diff = run(project, "dvc", "metrics", "diff", "main", "lr3")  # by name, from anywhere
    assert "reports/train_multi/metrics.json" in diff and "val.loss" in diff, diff

    # What a pull request shows: each plot with one curve per revision.
    rendered = json.loads(run(project, "dvc", "plots", "diff", "main", "lr3", "--json"))
    for plot in ("train_single_loss", "evaluate_multi_per_class_ap"):
        revisions = {rev for entry in rendered["data"][plot] for rev in entry["revisions"]}
        assert revisions == {"main", "lr3"}, (plot, revisions)

    rendered = json.loads(run(project, "dvc", "plots", "show", "--json"))
    plots = set(rendered["data"])
    for plot in (
        "train_single_loss",
        "train_multi_obj_loss",
        "evaluate_multi_pr_curves",
        "evaluate_multi_per_class_ap",
        "evaluate_single_confusion",
    ):
        assert plot in plots, sorted(plots)
    images = {p for p in plots if p.endswith(".png")}
    for figure in (
        "confusion.png",
        "predictions.png",
        "pr_curves.png",
        "nms_before_after.png",
        "class_counts.png",
        "training_curves.png",
    ):
        assert any(p.endswith(figure) for p in images), sorted(images)
    html = project / "plots_html"
    run(project, "dvc", "plots", "show", "-o", str(html))
    page = (html / "index.html").read_text()
    assert "evaluate_multi_pr_curves" in page and "nms_before_after.png" in page

    # A new backbone re-runs extract and everything after it, never prepare; `backbone.layer:
    # auto` (the default) takes resnet18's last feature map, layer4, with no second key to set.
    resnet = ["-S", "backbone.name=resnet18", "-S", "backbone.weights=random"]
    output = run(project, "dvc", "exp", "run", *resnet)
    assert (
        stages_run(output)
        == {"extract", "train_single", "evaluate_single", "train_multi", "evaluate_multi"}
        | FINETUNE
    )
    described = json.loads((project / "data/features/features.json").read_text())
    assert (described["name"], described["layer"]) == ("resnet18", "layer4")


def test_queued_experiments_run_in_the_background(project):
    """`dvc exp run --queue` twice, then `dvc queue start`: both variants run and are recorded.
    (Variants of eval.score_threshold: only evaluate_multi runs, which keeps the test short.)"""
    run(project, "git", "reset", "-q", "--hard", "main")  # the committed baseline
    run(project, "dvc", "checkout", "-q", "--force")
    for name, score in (("queued_a", "0.0"), ("queued_b", "0.9")):
        run(
            project,
            "dvc",
            "exp",
            "run",
            "--queue",
            "-S",
            f"eval.score_threshold={score}",
            "-n",
            name,
        )
    assert run(project, "dvc", "queue", "status").count("Queued") == 2

    run(project, "dvc", "queue", "start")  # one background worker; it exits when the queue is empty
    deadline = time.monotonic() + 600
    while True:
        status = run(project, "dvc", "queue", "status")
        if "Queued" not in status and "Running" not in status:
            break
        assert time.monotonic() < deadline, f"queued experiments still pending:\n{status}"
        time.sleep(2)
    for name in ("queued_a", "queued_b"):
        assert any(name in line and "Success" in line for line in status.splitlines()), status

    shown = run(project, "dvc", "exp", "show", "--no-pager", "--csv")
    rows = {line.split(",")[0]: line for line in shown.splitlines()}
    for name, score in (("queued_a", "0.0"), ("queued_b", "0.9")):
        assert name in rows and f",{score}," in rows[name], shown
    assert rows["queued_a"] != rows["queued_b"]
    diff = run(project, "dvc", "metrics", "diff", "queued_a", "queued_b")
    assert "reports/evaluate_multi/metrics.json" in diff and "detections_per_image" in diff, diff
    # the report between two experiments reads their per-image records from DVC's cache
    run(project, "python", "-m", "stages.report", "--base", "queued_a", "--new", "queued_b")
    text = (project / "report/report.md").read_text()
    headline = text.split("## Headline figures")[1].split("## Where the detector errs")[0]
    assert "| file | figure | queued_a | queued_b | change |" in headline
    for figure in ("map", "coco_map", "accuracy", "mean_iou"):
        assert f"| **{figure}** |" in headline
    # only the score threshold differs: the single head's figures do not move at all
    assert "| reports/evaluate_single | **accuracy** |" in headline
    accuracy = next(line for line in headline.splitlines() if "**accuracy**" in line)
    assert "+0.0000 … +0.0000 | within noise |" in accuracy
    assert "| eval.score_threshold | 0.0 | 0.9 |" in text
