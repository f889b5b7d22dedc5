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
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import typer

from pipeline_lib.backbones import load_backbone
from pipeline_lib.features import load_image_tensor

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"resnet18": ("layer4", 224), "efficientnet_lite0": ("blocks", 448)}


def cpu_flags() -> str:
    flags = Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0].split()
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return " ".join(f for f in wanted if f in flags) or "none of avx2/avx512/bf16/amx"


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


def main(
    voc: Path = REPO.parent / "shared/voc/VOCdevkit/VOC2007",
    images: int = 64,
) -> None:
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
