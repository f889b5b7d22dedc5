"""The GPU check (benchmarks/gpu_check.py) runs on a CPU too: a tiny smoke run of the whole chain
(every stage's real script, fine-tuning and predict included) and of the extraction table, on a
small VOC-layout folder. On a GPU machine the same script is what `make gpu-check` runs."""

from __future__ import annotations

from conftest import REPO, run, write_tiny_voc


def test_the_gpu_check_runs_every_stage_and_the_extraction_table_on_cpu(tmp_path):
    voc = tmp_path / "VOC2007"
    write_tiny_voc(voc, {"train": 6, "val": 4})
    out = tmp_path / "check.md"
    small = ["image.size=64", "grid.num_cells=2", "train.epochs=1", "finetune.batch_size=4"]
    output = run(
        tmp_path,
        "python",
        str(REPO / "benchmarks" / "gpu_check.py"),
        *("--device", "cpu", "--voc", str(voc), "--work", str(tmp_path / "work")),
        *("--finetune-epochs", "1", "--decodes", "24", "--backbones", "efficientnet_lite0"),
        *("--size", "64", "--batch", "8", "--out", str(out)),
        *[arg for setting in small for arg in ("--set", setting)],
    )
    report = out.read_text()
    assert report in output  # printed and written
    rows = {line.split(" | ")[0].strip("| "): line for line in report.splitlines()}
    stages = ["prepare", "extract", "train single", "evaluate single", "train multi"]
    stages += ["evaluate multi", "finetune", "evaluate finetune", "predict (3 photos)"]
    for stage in stages:
        assert f"| {stage} | ok |" in rows[stage], rows.get(stage)
    assert "6 train / 4 val images" in rows["prepare"]
    assert "s/epoch, epoch 1 kept" in rows["finetune"] and "mAP@0.5" in rows["evaluate multi"]
    assert "frozen ->" in rows["evaluate finetune"] and "3 images" in rows["predict (3 photos)"]
    speed = rows["efficientnet_lite0 at 64 (bfloat16)"] if "bfloat16" in report else None
    speed = speed or rows["efficientnet_lite0 at 64 (float32)"]
    assert "24 images" in speed and speed.rstrip(" |").endswith("%")
    params = (tmp_path / "work" / "params.yaml").read_text()
    assert "unfreeze: 3" in params and "root: VOCdevkit" in params  # the recipe, the linked data
