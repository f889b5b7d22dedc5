"""The whole chain under the real `dvc` CLI on the genuine VOC2007 subset beside the clone (579
train / 186 val photos), a few epochs: the metrics and figures of real photos."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import TEST_PRECISION, run

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


def test_whole_chain_on_the_genuine_voc_subset(tmp_path_factory, shared_voc):
    """`dvc repro` on ../shared/voc (VOC2007 train / val), few epochs: sane metrics and plots."""
    root = tmp_path_factory.mktemp("voc_project")
    for name in ("stages", "pipeline_lib"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(
        source="voc", root=str(shared_voc.parent), year=2007, train_split="train", val_split="val"
    )
    params["data"]["synthetic"].update(n_train=2, n_val=2, min_side=64, max_side=64)
    params["report"].update(samples=2, mode_samples=1)
    params["backbone"]["precision"] = TEST_PRECISION
    params["train"].update(epochs=3)
    params["eval"].update(samples=2)
    # 128 x 128 (4 x 4 maps): a twelfth of the default's backbone work, still far from chance
    params["image"]["size"], params["grid"]["num_cells"] = 128, 4
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(root, "git", "init", "-q")
    run(root, "dvc", "init", "-q")
    shutil.copytree(REPO / ".dvc" / "plots", root / ".dvc" / "plots", dirs_exist_ok=True)
    run(root, "git", "add", "-A")
    run(root, "git", "-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-qm", "voc")
    run(root, "dvc", "repro")

    prepared = json.loads((root / "reports/prepare/metrics.json").read_text())
    assert prepared["train"]["images"] == 579 and prepared["val"]["objects"] == 636
    single = json.loads((root / "reports/evaluate_single/metrics.json").read_text())
    assert single["images"] == 186 and single["accuracy"] > 0.4  # always "person" scores 0.19
    multi = json.loads((root / "reports/evaluate_multi/metrics.json").read_text())
    assert multi["objects"] == 636 and 0 < multi["map"] <= 1 and multi["map_iou_0.1"] > multi["map"]
    assert multi["overlap"] == "voc_inclusive_pixels"  # the devkit's overlap for VOC data
    for figure in ("evaluate_multi/figures/pr_curves.png", "evaluate_single/figures/confusion.png"):
        assert (root / "reports" / figure).stat().st_size > 1000
