"""The team workflow on the real `dvc` CLI: a VOC folder tracked by DVC (`dvc add` with the
symlink and hardlink cache types) used by the pipeline, and a round trip through a DVC remote."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import yaml
from conftest import built_once, run, snapshot, tiny_params, write_tiny_voc

REPO = Path(__file__).resolve().parents[2]
# one project for the module, its tests in order (one pytest-xdist process: tests/conftest.py)
pytestmark = pytest.mark.e2e
DATASET = Path("data/VOCdevkit")
ANNOTATION = DATASET / "VOC2007/Annotations/000000.xml"


@pytest.fixture(scope="module")
def alice(tmp_path_factory) -> Path:
    """A repository whose VOC folder is under `dvc add` with DVC's symlink cache, committed."""
    built_once(tmp_path_factory, "test_dvc_team")
    root = tmp_path_factory.mktemp("team") / "alice"
    for name in ("stages", "pipeline_lib"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root)
    params = tiny_params(yaml.safe_load((REPO / "params.yaml").read_text()), 2, 2, max_side=96)
    params["data"].update(source="voc", root=str(DATASET), year=2007)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    write_tiny_voc(root / DATASET / "VOC2007", {"train": 8, "val": 4})
    run(root, "git", "init", "-q", "-b", "main")
    run(root, "git", "config", "user.email", "alice@example.com")
    run(root, "git", "config", "user.name", "alice")
    run(root, "dvc", "init", "-q")
    run(root, "dvc", "config", "cache.type", "symlink")
    run(root, "dvc", "add", "-q", str(DATASET))
    run(root, "git", "add", "-A")
    run(root, "git", "commit", "-qm", "dataset and pipeline")
    return root


def test_a_voc_folder_under_dvc_with_the_symlink_cache_runs_to_the_end(alice):
    annotation = alice / ANNOTATION
    assert annotation.is_symlink()  # every file of the dataset is a link into .dvc/cache
    assert (alice / ".dvc/cache").resolve() in annotation.resolve().parents
    output = run(alice, "dvc", "repro")
    assert "Running stage 'evaluate_multi'" in output
    prepared = yaml.safe_load((alice / "reports/prepare/metrics.json").read_text())
    assert (prepared["train"]["images"], prepared["val"]["images"]) == (8, 4)
    assert prepared["train"]["skipped"] == 0 and prepared["val"]["skipped"] == 0
    assert (alice / "models/multi.safetensors").is_file()
    assert (alice / "reports/evaluate_multi/metrics.json").is_file()


def test_push_clone_pull_with_a_hardlink_cache(alice, tmp_path_factory):
    """Alice pushes to a shared remote; Bob clones, pulls into a hardlink cache, finds everything
    up to date, predicts with the pulled model, and re-runs the whole chain on his hardlinked
    copy of the dataset."""
    run(alice, "dvc", "repro")  # up to date after the test above (a process may run this alone)
    remote = tmp_path_factory.mktemp("remote")
    run(alice, "dvc", "remote", "add", "-d", "shared", str(remote))
    run(alice, "git", "add", "-A")
    run(alice, "git", "commit", "-qm", "results and remote")
    run(alice, "dvc", "push")

    bob = alice.parent / "bob"
    run(alice.parent, "git", "clone", "-q", str(alice), str(bob))
    run(bob, "dvc", "config", "--local", "cache.type", "hardlink")
    run(bob, "dvc", "pull")
    assert not (bob / ANNOTATION).is_symlink() and (bob / ANNOTATION).stat().st_nlink >= 2
    assert (bob / "models/multi.safetensors").stat().st_nlink >= 2
    assert "Data and pipelines are up to date" in run(bob, "dvc", "status")
    assert "Running stage" not in run(bob, "dvc", "repro")

    photo = bob / DATASET / "VOC2007/JPEGImages/000009.jpg"
    run(bob, sys.executable, "-m", "stages.predict", str(photo), "--out", "predictions")
    assert (bob / "predictions/000009.png").is_file()
    assert (bob / "predictions/detections.parquet").is_file()

    # the whole chain run again on the hardlinked dataset, on another clone: bit-identical
    # features and models, equal metrics (timings aside)
    output = run(bob, "dvc", "repro", "-f")
    assert output.count("Running stage") == 9
    assert snapshot(bob) == snapshot(alice)
