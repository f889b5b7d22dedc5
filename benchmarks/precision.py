"""Backbone speed and feature error in bfloat16 against float32, side by side in one run (issue 20's
groundwork: the pipeline itself still extracts in float32).

    .venv/bin/python benchmarks/precision.py [--voc PATH/TO/VOC2007] [--images 64]

For resnet18 at 224 and EfficientNet-Lite0 (last block) at 448, on this CPU: model-only images/s
on batches of 16 (channels_last, inference mode) in float32 and under bfloat16 autocast, and the
bfloat16 features' error against float32 ones on the first `--images` shared VOC photos:
relative error of the whole tensor (||bf16 - f32|| / ||f32||), mean absolute error over the mean
absolute value, and the largest absolute difference over the largest absolute value. The CPU's
flags come first: bfloat16 is fast only where the CPU has AVX-512 BF16 or AMX. resnet18 runs with
random weights where torchvision's cannot be downloaded (timing is the same; its error figures
then describe random features).

    .venv/bin/python benchmarks/precision.py --downstream /tmp/precision [--seeds 0,1]

instead measures what bfloat16 features do to the default heads: in a working folder on the
shared VOC subset (579 train / 186 val), the extract stage once as it is (float32) and once with
the backbone under bfloat16 autocast (the stage's own code, its model call wrapped), then for
each seed the real train and evaluate stages of both heads; printed per seed and as means.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import torch
import typer
from workfolder import cpu_flags, stage, write_params

from pipeline_lib.backbones import load_backbone
from pipeline_lib.features import load_image_tensor

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"resnet18": ("layer4", 224), "efficientnet_lite0": ("blocks", 448)}


def forward(model, mean, std, batch: torch.Tensor, bf16: bool) -> torch.Tensor:
    x = ((batch.float() - mean) / std).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return model(x).float()


def images_per_second(model, mean, std, size: int, bf16: bool, seconds: float = 8.0) -> float:
    batch = torch.randint(0, 256, (16, 3, size, size), dtype=torch.uint8)
    forward(model, mean, std, batch, bf16)  # warm-up (oneDNN primitives)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        forward(model, mean, std, batch, bf16)
        done += len(batch)
    return done / (time.perf_counter() - start)


BF16_EXTRACT = """
import torch
import pipeline_lib.features as features
plain = features.prepare_model
def prepare_model(*args, **kwargs):
    forward = plain(*args, **kwargs)
    def bf16(batch):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return forward(batch)
    return bf16
features.prepare_model = prepare_model
from stages import extract
extract.app(["--params", "params.yaml"])
"""


def downstream(folder: Path, voc: Path, seeds: list[int]) -> None:
    """Default heads on float32 and on bfloat16 features of the VOC subset, seed by seed."""
    import hashlib
    import json
    import shutil
    import subprocess
    import sys

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
        if precision == "float32":
            stage(work, "extract")
        else:
            env = {"PYTHONPATH": str(REPO)}
            command = [sys.executable, "-c", BF16_EXTRACT]
            subprocess.run(command, cwd=work, check=True, capture_output=True, env=env)
        digest = hashlib.md5((work / "data/features/train.safetensors").read_bytes()).hexdigest()
        print(f"{precision} features: train.safetensors md5 {digest[:8]}", flush=True)
        for seed in seeds:
            write_params(work, voc_keys | {"train.seed": seed})
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
    for precision, rows in results.items():
        means = [sum(r[i] for r in rows) / len(rows) for i in range(3)]
        print(
            f"{precision} mean of {len(rows)}: mAP {means[0]:.4f}, accuracy {means[1]:.4f}, "
            f"mean IoU {means[2]:.4f}"
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
        model = backbone.module.eval().to(memory_format=torch.channels_last)
        mean = torch.tensor(backbone.mean).view(1, 3, 1, 1) * 255
        std = torch.tensor(backbone.std).view(1, 3, 1, 1) * 255
        speeds = [images_per_second(model, mean, std, size, bf16) for bf16 in (False, True)]
        batch = torch.stack([load_image_tensor(p, "shrink", size) for p in paths])
        exact = torch.cat([forward(model, mean, std, b, False) for b in batch.split(16)])
        approx = torch.cat([forward(model, mean, std, b, True) for b in batch.split(16)])
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
