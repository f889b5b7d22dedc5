"""torchrun on CPU (gloo, 2 processes): sharded extraction writes the file one process writes,
byte for byte; a rank that fails stops the job and leaves no feature file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, built_once, tiny_params

# one project for the module, its tests in order (one pytest-xdist process: tests/conftest.py)
pytestmark = pytest.mark.e2e
FILES = ("train.safetensors", "val.safetensors", "features.json")


def stage(folder: Path, *args: str, check: bool = True, timeout: int = 300):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, *args],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def set_params(folder: Path, **groups) -> None:
    params = yaml.safe_load((folder / "params.yaml").read_text())
    for group, values in groups.items():
        params[group].update(values)
    (folder / "params.yaml").write_text(yaml.safe_dump(params))


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """45 images (40 train: three batches of 16, the last short; 5 val), prepared, and the
    features of a one-process run in reference/."""
    built_once(tmp_path_factory, "test_distributed")
    folder = tmp_path_factory.mktemp("sharded")
    params = tiny_params(yaml.safe_load((REPO / "params.yaml").read_text()), 40, 5)
    params["backbone"].update(batch_size=16, processes=1)
    # 224: a quarter of the default's work. Batches of 16 (the last one padded to 16): oneDNN then
    # sums in the same order with 1 thread (2 ranks on 2 cores) as with 2 (one process).
    params["image"]["size"] = 224
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    stage(folder, "-m", "stages.synthesize", "--workers", "1")
    stage(folder, "-m", "stages.prepare")
    stage(folder, "-m", "stages.extract")
    shutil.move(folder / "data/features", folder / "reference")
    return folder


def copy_of(project: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "project"
    shutil.copytree(project, folder, symlinks=True)
    shutil.rmtree(folder / "reports/extract")  # the reference run's
    return folder


def truncate_train_image(folder: Path, index: int) -> str:
    """Cut the `index`-th train image (row order) in half; its file name."""
    dataset = folder / "data/synthetic/VOCdevkit/VOCshapes"
    image_id = (dataset / "ImageSets/Main/train.txt").read_text().split()[index]
    path = dataset / "JPEGImages" / f"{image_id}.jpg"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path.name


def test_two_processes_write_the_one_process_files_byte_for_byte(project, tmp_path):
    folder = copy_of(project, tmp_path)
    set_params(folder, backbone={"processes": 2})  # the stage restarts itself under torchrun
    done = stage(folder, "-m", "stages.extract")
    assert "torch.distributed.run --standalone --nproc-per-node=2" in done.stdout
    for name in FILES:
        produced = (folder / "data/features" / name).read_bytes()
        assert produced == (folder / "reference" / name).read_bytes(), name
    report = json.loads((folder / "reports/extract/report.json").read_text())
    assert report["processes"] == 2 and report["splits"]["train"]["images"] == 40


def test_skipped_images_are_left_out_the_same_way(project, tmp_path):
    folder = copy_of(project, tmp_path)
    name = truncate_train_image(folder, 30)  # in rank 1's share (batches 2 and 3)
    set_params(folder, data={"on_error": "skip"})
    stage(folder, "-m", "stages.extract")
    one = {n: (folder / "data/features" / n).read_bytes() for n in FILES}
    set_params(folder, backbone={"processes": 2})
    stage(folder, "-m", "stages.extract")
    for n in FILES:
        assert (folder / "data/features" / n).read_bytes() == one[n], n
    report = json.loads((folder / "reports/extract/report.json").read_text())
    skipped = report["splits"]["train"]["skipped_images"]
    assert report["splits"]["train"]["images"] == 39 and len(skipped) == 1
    assert name in skipped[0]["reason"]


def test_a_failing_rank_stops_every_process_and_leaves_no_features(project, tmp_path):
    folder = copy_of(project, tmp_path)
    name = truncate_train_image(folder, 35)  # rank 1's; rank 0's share is fine
    start = time.monotonic()
    done = stage(
        folder,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "stages.extract",
        check=False,
        timeout=240,
    )
    assert done.returncode != 0
    assert time.monotonic() - start < 180  # torchrun stopped rank 0, which waited for rank 1
    assert "error: " in done.stderr and name in done.stderr
    assert not (folder / "data/features").exists()
    assert not list((folder / "data").rglob("*.safetensors"))
    assert not (folder / "reports/extract/report.json").exists()


def test_finetuning_in_two_processes_reports_the_mean_over_ranks(trained, tmp_path, monkeypatch):
    from pipeline_lib.base.distributed import Ranks
    from pipeline_lib.base.params import load_params
    from pipeline_lib.data.tables import read_prepared
    from pipeline_lib.models.checkpoints import load_checkpoint
    from pipeline_lib.training.finetuning import ImageBatches, image_loader, rebuild
    from pipeline_lib.training.loop import TrainConfig, run_epoch
    from pipeline_lib.training.tasks import loss_weights

    folder = tmp_path / "project"
    shutil.copytree(trained, folder, ignore=shutil.ignore_patterns("reports"))
    finetune = dict(enabled=True, epochs=1, batch_size=2, unfreeze=1, workers=0, processes=2)
    set_params(folder, finetune=finetune)
    done = stage(folder, "-m", "stages.finetune", "train", "--no-progress")
    assert "on 12 images, cpu in 2 processes" in done.stdout
    assert done.stdout.count("epoch   1/1") == 1  # rank 0 alone prints
    assert sorted(p.name for p in (folder / "models/finetuned").iterdir()) == ["model.safetensors"]
    reported = json.loads((folder / "reports/finetune/metrics.json").read_text())

    # The saved model (epoch 1, the only one) on each rank's half of val, in this process:
    monkeypatch.chdir(folder)  # the dataset folder in data/prepared is relative
    params = load_params(folder / "params.yaml")
    checkpoint = load_checkpoint(folder / "models/finetuned/model.safetensors")
    prepared = read_prepared(folder / "data/prepared")
    config = TrainConfig(1, 2, 0.01, 0.0, device="cpu")
    _, model = rebuild(checkpoint)
    objective = model.head.objective(loss_weights(params.train))  # as fine-tuning asks the head
    losses = []
    for rank in (0, 1):
        ranks = Ranks(rank, 2)
        loader = image_loader(
            params.finetune, checkpoint, prepared, "val", model.mean.device, ranks
        )
        losses.append(run_epoch(model, ImageBatches(loader), objective, config)["loss"])
    assert abs(losses[0] - losses[1]) > 1e-4  # the halves differ, so the check below can fail
    assert reported["best"]["val_loss"] == pytest.approx(sum(losses) / 2, rel=1e-4)

    image = next((folder / "data/synthetic").rglob("*.jpg"))
    model_file = "models/finetuned/model.safetensors"
    stage(folder, "-m", "stages.predict", str(image), "--model", model_file, "--out", "out")
    assert (folder / "out" / f"{image.stem}.png").is_file()
