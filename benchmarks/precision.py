"""Backbone speed and feature error in bfloat16 against float32 (`backbone.precision`), side by side
in one run.

    .venv/bin/python benchmarks/precision.py [--voc PATH/TO/VOC2007] [--images 64]

For resnet18 at 224 and EfficientNet-Lite0 (last block) at 448, on this CPU: model-only images/s
on batches of 16 (the stage's model function, devices.prepare_model) in each precision, and the
bfloat16 features' error against float32 ones on the first `--images` shared VOC photos:
relative error of the whole tensor (||bf16 - f32|| / ||f32||), mean absolute error over the mean
absolute value, and the largest absolute difference over the largest absolute value. The CPU's
flags come first: bfloat16 is fast only where the CPU has AVX-512 BF16 or AMX. resnet18 runs with
random weights where torchvision's cannot be downloaded (timing is the same; its error figures
then describe random features).

    .venv/bin/python benchmarks/precision.py --downstream /tmp/precision [--seeds 0,1]

instead measures what bfloat16 features do to the default heads: in a working folder on the
shared VOC subset (579 train / 186 val), the extract stage once with backbone.precision float32
and once with bfloat16, then for each seed the real train and evaluate stages of both heads;
printed per seed, as mean and spread (sample standard deviation) over the seeds, and as the
differences of the two precisions seed by seed (paired: the seed noise cancels).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Annotated

import torch
import typer
from workfolder import cpu_flags, stage, write_params

from pipeline_lib.features.backbones import load_backbone
from pipeline_lib.features.devices import PRECISIONS, prepare_model
from pipeline_lib.features.images import load_image_tensor

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"resnet18": ("layer4", 224), "efficientnet_lite0": ("blocks", 448)}
CPU = torch.device("cpu")


def images_per_second(forward, size: int, seconds: float = 8.0) -> float:
    batch = torch.randint(0, 256, (16, 3, size, size), dtype=torch.uint8)
    forward(batch)  # warm-up (oneDNN primitives)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        forward(batch)
        done += len(batch)
    return done / (time.perf_counter() - start)


def spread_of(columns: torch.Tensor) -> list[float]:
    """Sample standard deviation of each row (0 for a single seed)."""
    return (columns.std(1) if columns.shape[1] > 1 else torch.zeros(len(columns))).tolist()


def downstream(folder: Path, voc: Path, seeds: list[int]) -> None:
    """Default heads on float32 and on bfloat16 features of the VOC subset, seed by seed."""

    voc_keys = {"data.source": "voc", "data.root": str(voc.parent), "data.year": 2007}
    voc_keys |= {"data.train_split": "train", "data.val_split": "val"}
    print(f"CPU flags: {cpu_flags()}; VOC subset {voc}; seeds {seeds}")
    results: dict[str, list] = {}
    for precision in ("float32", "bfloat16"):
        work = folder / precision
        shutil.rmtree(work, ignore_errors=True)
        write_params(work, voc_keys)
        subprocess.run(["git", "init", "-q"], cwd=work, check=True)  # dvclive wants a repository
        subprocess.run(
            ["git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-q", "--allow-empty"]
            + ["-m", "benchmark"],
            cwd=work,
            check=True,
        )
        stage(work, "prepare")
        write_params(work, voc_keys | {"backbone.precision": precision})
        stage(work, "extract")
        digest = hashlib.md5((work / "data/features/train.safetensors").read_bytes()).hexdigest()
        print(f"{precision} features: train.safetensors md5 {digest[:8]}", flush=True)
        for seed in seeds:
            write_params(work, voc_keys | {"backbone.precision": precision, "train.seed": seed})
            row = {}
            for kind in ("single", "multi"):
                stage(work, "train", kind, "--no-progress")
                stage(work, "evaluate", kind)
                row[kind] = json.loads((work / f"reports/evaluate_{kind}/metrics.json").read_text())
            single, multi = row["single"], row["multi"]
            figures = (multi["map"], single["accuracy"], single["mean_iou"])
            results.setdefault(precision, []).append(figures)
            print(
                f"{precision} seed {seed}: grid mAP@0.5 {figures[0]:.4f}, single accuracy "
                f"{figures[1]:.4f}, mean IoU {figures[2]:.4f}",
                flush=True,
            )
    if len(results) == 2:  # the same seeds on both: their differences, seed by seed
        paired = torch.tensor(results["bfloat16"]) - torch.tensor(results["float32"])
        mean, spread = paired.mean(0).tolist(), spread_of(paired.T)
        print(
            f"bfloat16 - float32, paired by seed (mean +- std): mAP {mean[0]:+.4f} +- "
            f"{spread[0]:.4f}, accuracy {mean[1]:+.4f} +- {spread[1]:.4f}, "
            f"mean IoU {mean[2]:+.4f} +- {spread[2]:.4f}"
        )
    for precision, rows in results.items():
        columns = torch.tensor(rows).T  # mAP, accuracy, IoU x seeds
        mean, spread = columns.mean(1).tolist(), spread_of(columns)
        print(
            f"{precision} over {len(rows)} seeds (mean +- std): mAP {mean[0]:.4f} +- "
            f"{spread[0]:.4f}, accuracy {mean[1]:.4f} +- {spread[1]:.4f}, "
            f"mean IoU {mean[2]:.4f} +- {spread[2]:.4f}"
        )


def main(
    voc: Path = REPO.parent / "shared/voc/VOCdevkit/VOC2007",
    images: int = 64,
    downstream_folder: Annotated[Path | None, typer.Option("--downstream")] = None,
    seeds: str = "0,1",
) -> None:
    if downstream_folder is not None:
        downstream(downstream_folder, voc, [int(s) for s in seeds.split(",")])
        return
    print(f"CPU flags: {cpu_flags()}; {torch.get_num_threads()} threads; torch {torch.__version__}")
    paths = sorted((voc / "JPEGImages").glob("*.jpg"))[:images]
    columns = ["backbone", "size", "f32 img/s", "bf16 img/s", "bf16/f32", "rel. error"]
    columns += ["mean abs / mean", "max abs / max"]
    print("| " + " | ".join(columns) + " |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (layer, size) in SETTINGS.items():
        # torchvision's weights need a download (not possible offline): random ones for resnet18
        weights = "imagenet" if name.startswith("efficientnet") else "random"
        backbone = load_backbone(name, layer, weights)
        forwards = [prepare_model(backbone, CPU, batch_size=16, precision=p) for p in PRECISIONS]
        speeds = [images_per_second(forward, size) for forward in forwards]
        batch = torch.stack([load_image_tensor(p, "shrink", size) for p in paths])
        exact, approx = (torch.cat([f(b) for b in batch.split(16)]) for f in forwards)
        diff = (approx - exact).abs()
        relative = float((approx - exact).norm() / exact.norm())
        ratio = speeds[1] / speeds[0]
        print(
            f"| {name} ({weights}) | {size} | {speeds[0]:.1f} | {speeds[1]:.1f} | {ratio:.2f} | "
            f"{relative:.4f} | {float(diff.mean() / exact.abs().mean()):.4f} | "
            f"{float(diff.max() / exact.abs().max()):.4f} |",
            flush=True,
        )


if __name__ == "__main__":
    typer.run(main)
