"""Benchmark feature extraction, side by side in one run, on the genuine VOC2007 subset.

    .venv/bin/python benchmarks/extract.py [--voc PATH/TO/VOC2007] [--backbones resnet18,...]

For each backbone it prints
  (a) end-to-end images/s of the stage's path (decode -> features streamed to a file),
  (b) model-only images/s on random tensors of the same shape,
  (c) a naive baseline built like the original lab: a Dataset with PIL and
      transforms.Resize/ToTensor/Normalize, DataLoader(batch_size=128, num_workers=2), NCHW float32
      eager model,
  (d) FLOPs per image and model throughput as a fraction of this machine's float32 matmul GFLOP/s,
and the ratios the goals are about: (a)/(c) >= 1.8 and (a)/(b) >= 0.9 (resnet18, 2 CPU cores).
(a) and (b) are measured for the default eager path and for `backbone.compile: true`
(torch.compile; its one-off compile time is printed apart, then timed with a warm cache).
Then peak RSS of the extraction path (via /usr/bin/time -v) at two dataset sizes: it must not grow
with the number of images. Random weights are used for torchvision models (timing only).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import typer
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms

from pipeline_lib.backbones import load_backbone
from pipeline_lib.features import ExtractSettings, extract_features, pick_device, prepare_model
from pipeline_lib.geometry import ImageSpec

REPO = Path(__file__).resolve().parents[1]
SIZE = 224


def voc_images(voc: Path, limit: int) -> tuple[list[Path], list[str]]:
    ids = (voc / "ImageSets" / "Main" / "trainval.txt").read_text().split()[:limit]
    return [voc / "JPEGImages" / f"{i}.jpg" for i in ids], ids


def end_to_end(backbone, paths, ids, batch_size: int, compile: bool = False) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        result = extract_features(
            backbone,
            dict(zip(ids, paths, strict=True)),
            Path(tmp) / "f.safetensors",
            ImageSpec("shrink", SIZE),
            ExtractSettings(batch_size=batch_size, device="cpu", compile=compile),
            progress=None,
        )
    return result.images_per_second


def compile_seconds(backbone, batch_size: int) -> float:
    """Time to the first compiled batch (cold: a fresh inductor cache directory)."""
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        forward = prepare_model(backbone, torch.device("cpu"), True, batch_size)
        start = time.perf_counter()
        forward(torch.zeros((batch_size, 3, SIZE, SIZE), dtype=torch.uint8))
        seconds = time.perf_counter() - start
        del os.environ["TORCHINDUCTOR_CACHE_DIR"]
    torch._dynamo.reset()
    return seconds


def model_only(backbone, n: int, batch_size: int, compile: bool = False) -> float:
    forward = prepare_model(backbone, torch.device("cpu"), compile, batch_size)
    batch = torch.randint(0, 256, (batch_size, 3, SIZE, SIZE), dtype=torch.uint8)
    forward(batch)  # warm-up (oneDNN primitive creation, compilation)
    start = time.perf_counter()
    done = 0
    while done < n:
        forward(batch)
        done += batch_size
    return done / (time.perf_counter() - start)


class NaiveDataset(Dataset):
    """How the original lab loads images: PIL + torchvision transforms, float32 per image."""

    def __init__(self, paths, mean, std):
        self.paths = paths
        self.transform = transforms.Compose(
            [
                transforms.Resize((SIZE, SIZE)),
                transforms.ToTensor(),
                transforms.Normalize(mean, std),
            ]
        )

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return self.transform(Image.open(self.paths[index]).convert("RGB"))


def naive(backbone, paths) -> float:
    model = backbone.module.eval()
    loader = DataLoader(
        NaiveDataset(paths, backbone.mean, backbone.std), batch_size=128, num_workers=2
    )
    start = time.perf_counter()
    with torch.no_grad():
        for batch in loader:
            model(batch)
    return len(paths) / (time.perf_counter() - start)


def flops_per_image(backbone) -> float:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        backbone.module.eval()(torch.zeros(1, 3, SIZE, SIZE))
    return counter.get_total_flops()


def matmul_gflops(n: int = 2048, repeats: int = 10, rounds: int = 3) -> float:
    """Best of `rounds` timings of `repeats` float32 n x n matmuls."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9)
    return best


def peak_rss_mib(voc: Path, limit: int) -> float | None:
    """Peak RSS (MiB) of a child process that extracts `limit` images (resnet18)."""
    if not Path("/usr/bin/time").exists():
        return None
    command = [
        "/usr/bin/time",
        "-v",
        sys.executable,
        __file__,
        "--voc",
        str(voc),
        "--limit",
        str(limit),
        "--rss-probe",
        str(limit),
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=True)
    kib = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    return int(kib.group(1)) / 1024 if kib else None


def main(
    voc: Path = REPO.parent / "shared/voc/VOCdevkit/VOC2007",
    backbones: str = "resnet18,efficientnet_lite0",
    limit: int = 384,
    batch_size: int = 16,
    rounds: int = 2,
    rss_probe: int = 0,
) -> None:
    if not (voc / "JPEGImages").is_dir():
        raise SystemExit(f"no VOC folder at {voc} (pass --voc)")
    paths, ids = voc_images(voc, limit)
    if rss_probe:  # child process of peak_rss_mib
        backbone = load_backbone("resnet18", None, "random")
        end_to_end(backbone, paths[:rss_probe], ids[:rss_probe], batch_size)
        return

    torch.set_num_threads(os.cpu_count() or 1)
    roofline = matmul_gflops()
    print(
        f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"float32 matmul {roofline:.0f} GFLOP/s; device for the stage: {pick_device('auto')}; "
        f"{len(paths)} VOC images"
    )
    for name in backbones.split(","):
        weights = "imagenet" if name == "efficientnet_lite0" else "random"
        backbone = load_backbone(name, None, weights)
        plain = load_backbone(name, None, weights)  # stays NCHW: prepare_model converts its module
        flops = flops_per_image(backbone)
        # Interleaved rounds, best of each: the machines are shared and noisy.
        cold = compile_seconds(backbone, batch_size)
        fast, model = {False: 0.0, True: 0.0}, {False: 0.0, True: 0.0}
        slow = 0.0
        for _ in range(rounds):
            for compiled in (False, True):
                a = end_to_end(backbone, paths, ids, batch_size, compiled)
                b = model_only(backbone, len(paths), batch_size, compiled)
                fast[compiled], model[compiled] = max(fast[compiled], a), max(model[compiled], b)
            slow = max(slow, naive(plain, paths))
        print(
            f"{name}: {flops / 1e9:.2f} GFLOP/image; naive lab-style baseline (c) "
            f"{slow:.1f} images/s"
        )
        for compiled, label in (
            (False, "eager (default)"),
            (True, f"compiled (cold compile {cold:.0f} s)"),
        ):
            a, b = fast[compiled], model[compiled]
            print(
                f"  {label}: (a) end-to-end {a:.1f} images/s, (b) model only {b:.1f} images/s "
                f"= {b * flops / 1e9 / roofline:.0%} of the matmul roofline"
            )
            print(
                f"    end-to-end / naive = {a / slow:.2f}x (goal >= 1.8x); "
                f"end-to-end / model-only = {a / b:.0%} (goal >= 90%)"
            )

    small, large = 96, len(voc_images(voc, 10**6)[0])
    rss = [peak_rss_mib(voc, n) for n in (small, large)]
    if None in rss:
        print("peak RSS: /usr/bin/time not available")
    else:
        print(
            f"peak RSS (resnet18 extraction, /usr/bin/time -v): {small} images {rss[0]:.0f} MiB, "
            f"{large} images {rss[1]:.0f} MiB"
        )


if __name__ == "__main__":
    typer.run(main)
