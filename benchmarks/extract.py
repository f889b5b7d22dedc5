"""Benchmark feature extraction, side by side in one run, on the genuine VOC2007 subset.

    .venv/bin/python benchmarks/extract.py [--voc PATH/TO/VOC2007] [--backbones resnet18,...]
                                           [--limit 765] [--compile]
    .venv/bin/python benchmarks/extract.py --against REVISION [--backbones ...] [--rounds 3]

It prints, after the CPU's flags (AVX2, AVX-512, BF16, AMX) and the precision `auto` picks here:
  decode + resize per image, one core, on the VOC photos and on phone-size ones (the VOC photos
      upscaled 4x): PIL resize (the former stage), torchvision's uint8 resize after PIL's
      full decode, torchvision's decode_jpeg, and the stage now: PIL's JPEG `draft` (DCT
      downscaling, where the photo is at least twice the size) and torchvision's resize;
  per backbone (resnet18 at 224, EfficientNet-Lite0 at 448, the default):
  (c) the naive lab-style path: a Dataset with PIL and transforms.Resize/ToTensor/Normalize,
      DataLoader(batch_size=128, num_workers=2), NCHW float32 eager model, and the stage as it
      was formerly (float32, PIL's resize) end to end;
  and for each precision (float32, bfloat16):
  (b) model-only images/s on uint8 batches of the same shape (the stage's model function),
  (a) end-to-end images/s of the stage's path (extract_features: decode -> features in a file),
      with the ratios the goals are about: (a)/(c) >= 1.8 and (a)/(b) >= 0.9;
  for resnet18, how to split the 2 cores: decoding processes (workers) x model threads;
  the whole `extract` stage (`python -m stages.extract`, start-up included) per precision, on all
      the photos with resnet18; peak RSS of the extraction at two dataset sizes (must not grow).
`--against REVISION` instead runs only the stage's path end to end, of that git revision and of
this tree, in alternating processes (a change to the CPU path must not make it slower).
Interleaved rounds, best of each: the machines are shared and noisy. torchvision backbones run
with random weights (no download here: timing is the same). To see what an AVX2-only CPU would
do, cap the kernels: `ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 ... --backbones resnet18`
and `--precisions float32` (`auto` still reads the CPU's flags, and bfloat16 is emulated there).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import typer
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms
from torchvision.transforms.v2 import functional as F
from workfolder import cpu_flags, stage, write_params

from pipeline_lib.base.distributed import ONE_PROCESS, Ranks
from pipeline_lib.boxes.geometry import ImageSpec
from pipeline_lib.features import extraction
from pipeline_lib.features import images as images_module
from pipeline_lib.features.backbones import load_backbone
from pipeline_lib.features.devices import pick_device, pick_precision, prepare_model
from pipeline_lib.features.extraction import ExtractSettings, extract_features
from pipeline_lib.features.images import load_image_tensor

REPO = Path(__file__).resolve().parents[1]
SIZES = {"resnet18": 224, "resnet50": 224, "efficientnet_lite0": 448}


def voc_images(voc: Path, limit: int) -> tuple[list[Path], list[str]]:
    ids = (voc / "ImageSets" / "Main" / "trainval.txt").read_text().split()[:limit]
    return [voc / "JPEGImages" / f"{i}.jpg" for i in ids], ids


# --- decoding ---------------------------------------------------------------------------------


def pil_resize(path: Path, size: int) -> torch.Tensor:
    """The former stage: PIL decodes and resizes."""
    with Image.open(path) as image:
        image = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()


def full_decode(path: Path, size: int) -> torch.Tensor:
    """PIL decodes the whole photo, torchvision resizes."""
    with Image.open(path) as image:
        pixels = F.pil_to_tensor(image.convert("RGB"))
    return F.resize(pixels, [size, size], antialias=True).contiguous()


def torchvision_decode(path: Path, size: int) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    pixels = decode_jpeg(read_file(str(path)), mode=ImageReadMode.RGB)
    return F.resize(pixels, [size, size], antialias=True).contiguous()


def stage_decode(path: Path, size: int) -> torch.Tensor:
    """The stage: PIL decodes (a JPEG >= 2x the size each way by DCT scaling), torchvision
    resizes."""
    return load_image_tensor(path, "shrink", size)


DECODERS = {
    "PIL decode + PIL resize (before)": pil_resize,
    "PIL decode + torchvision resize": full_decode,
    "torchvision decode_jpeg + resize": torchvision_decode,
    "the stage: PIL with draft + torchvision resize": stage_decode,
}


@contextlib.contextmanager
def decoding_as_before():
    """The stage's decoding as it was formerly (PIL's resize), in its worker processes
    too (they fork with the module as patched)."""
    stage_loader = images_module.load_image_tensor
    images_module.load_image_tensor = lambda path, mode, size: pil_resize(path, size)
    try:
        yield
    finally:
        images_module.load_image_tensor = stage_loader


def phone_size_photos(paths: list[Path], folder: Path) -> list[Path]:
    """The photos upscaled 4x (~2000 x 1500), saved as JPEG quality 90."""
    out = []
    for path in paths:
        target = folder / path.name
        with Image.open(path) as image:
            big = image.convert("RGB").resize((image.width * 4, image.height * 4))
        big.save(target, quality=90)
        out.append(target)
    return out


def decode_ms(decoder, paths: list[Path], size: int, rounds: int = 2) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for path in paths:
            decoder(path, size)
        best = min(best, (time.perf_counter() - start) / len(paths))
    return best * 1e3


def decoding(paths: list[Path], sizes: list[int]) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    with tempfile.TemporaryDirectory() as tmp:
        sets = {
            "VOC photos": paths[:150],
            "phone-size (VOC x4)": phone_size_photos(paths[:30], Path(tmp)),
        }
        print("\ndecode + resize per image, one core (ms):")
        print("| photos | size | " + " | ".join(DECODERS) + " |")
        print("|---|---|" + "---|" * len(DECODERS))
        for name, files in sets.items():
            for size in sizes:
                cells = [f"{decode_ms(d, files, size):.2f}" for d in DECODERS.values()]
                print(f"| {name} | {size} | " + " | ".join(cells) + " |", flush=True)
        first = sets["phone-size (VOC x4)"][0]
        gap = (stage_decode(first, 224).float() - full_decode(first, 224).float()).abs().mean()
        print(f"draft vs full decode, a phone-size photo at 224: mean difference {gap:.2f} levels")
    torch.set_num_threads(threads)


# --- the model, the stage, the lab ------------------------------------------------------------


def end_to_end(
    backbone, paths, ids, size: int, settings: ExtractSettings, ranks=ONE_PROCESS
) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        spec = ImageSpec("shrink", size)
        images = dict(zip(ids, paths, strict=True))
        out = Path(tmp) / "f.safetensors"
        result = extract_features(backbone, images, out, spec, settings, None, ranks)
    torch.set_num_threads(os.cpu_count() or 1)
    return result.images_per_second


def model_only(backbone, size: int, settings: ExtractSettings, seconds: float = 8.0) -> float:
    forward = prepare_model(
        backbone, torch.device("cpu"), settings.compile, settings.batch_size, settings.precision
    )
    batch = torch.randint(0, 256, (settings.batch_size, 3, size, size), dtype=torch.uint8)
    forward(batch)  # warm-up (oneDNN primitive creation, compilation)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        forward(batch)
        done += len(batch)
    return done / (time.perf_counter() - start)


class NaiveDataset(Dataset):
    """How the original lab loads images: PIL + torchvision transforms, float32 per image."""

    def __init__(self, paths, mean, std, size: int):
        self.paths = paths
        self.transform = transforms.Compose(
            [
                transforms.Resize((size, size)),
                transforms.ToTensor(),
                transforms.Normalize(mean, std),
            ]
        )

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return self.transform(Image.open(self.paths[index]).convert("RGB"))


def naive(backbone, paths, size: int) -> float:
    model = backbone.module.eval()
    dataset = NaiveDataset(paths, backbone.mean, backbone.std, size)
    loader = DataLoader(dataset, batch_size=128, num_workers=2)
    start = time.perf_counter()
    with torch.no_grad():
        for batch in loader:
            model(batch)
    return len(paths) / (time.perf_counter() - start)


def flops_per_image(backbone, size: int) -> float:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        backbone.module.eval()(torch.zeros(1, 3, size, size))
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


def backbone_rows(
    name: str, paths, ids, precisions: list[str], batch_size: int, rounds: int, compile: bool
) -> None:
    size = SIZES.get(name, 224)
    weights = "imagenet" if name.startswith("efficientnet") else "random"
    backbone = load_backbone(name, None, weights)
    plain = load_backbone(name, None, weights)  # stays NCHW: prepare_model converts its module
    flops = flops_per_image(plain, size)
    variants = {
        p: ExtractSettings(batch_size=batch_size, device="cpu", precision=p) for p in precisions
    }
    if compile:
        variants |= {
            f"{p} compiled": ExtractSettings(
                batch_size=batch_size, device="cpu", precision=p, compile=True
            )
            for p in precisions
        }
    as_before = ExtractSettings(batch_size=batch_size, device="cpu", precision="float32")
    fast = dict.fromkeys(variants, 0.0)
    model = dict.fromkeys(variants, 0.0)
    slow = before = 0.0
    for _ in range(rounds):
        for label, settings in variants.items():
            fast[label] = max(fast[label], end_to_end(backbone, paths, ids, size, settings))
            model[label] = max(model[label], model_only(backbone, size, settings))
        slow = max(slow, naive(plain, paths, size))
        with decoding_as_before():
            before = max(before, end_to_end(backbone, paths, ids, size, as_before))
    print(f"\n{name} at {size} ({weights} weights): {flops / 1e9:.2f} GFLOP/image")
    print(f"  (c) naive lab-style path: {slow:.1f} images/s")
    print(f"  the former stage (float32, PIL's resize): {before:.1f} images/s end-to-end")
    for label in variants:
        a, b = fast[label], model[label]
        print(
            f"  {label}: (b) model only {b:.1f} images/s, (a) end-to-end {a:.1f} images/s: "
            f"(a)/(c) = {a / slow:.2f}x (goal >= 1.8x), (a)/(b) = {a / b:.0%} (goal >= 90%)",
            flush=True,
        )


def core_split(paths, ids, precision: str, batch_size: int) -> None:
    """End-to-end resnet18 at 224 with 0, 1, 2 decoding processes and 2 or 1 model threads."""
    backbone = load_backbone("resnet18", None, "random")
    print(f"\nsplitting the cores (resnet18 at 224, {precision}, end-to-end images/s):")
    print("| decoding processes | model threads 2 | model threads 1 |")
    print("|---|---|---|")
    for workers in (0, 1, 2):
        settings = ExtractSettings(
            batch_size=batch_size, device="cpu", precision=precision, workers=workers
        )
        cells = []
        for ranks in (
            ONE_PROCESS,
            Ranks(local_world=2),
        ):  # local_world 2: this process gets 1 thread
            cells.append(f"{end_to_end(backbone, paths, ids, 224, settings, ranks):.1f}")
        print(f"| {workers} | " + " | ".join(cells) + " |", flush=True)


def whole_stage(voc: Path, folder: Path, precisions: list[str]) -> None:
    """`python -m stages.extract` on the VOC subset (train + val), resnet18 at 224, each
    precision."""
    keys = {"data.source": "voc", "data.root": str(voc.parent), "data.year": 2007}
    keys |= {"data.train_split": "train", "data.val_split": "val", "image.size": 224}
    keys |= {"backbone.name": "resnet18", "backbone.weights": "random"}
    write_params(folder, keys)
    stage(folder, "prepare")
    print(
        "\nthe whole extract stage (python -m stages.extract, start-up included), resnet18 at 224:"
    )
    for precision in precisions:
        write_params(folder, keys | {"backbone.precision": precision})
        start = time.perf_counter()
        output = stage(folder, "extract")
        seconds = time.perf_counter() - start
        images = sum(int(n) for n in re.findall(r"(\d+) images ->", output))
        inside = ", ".join(re.findall(r"\(([\d.]+ images/s)", output))
        print(
            f"  {precision}: {images} images in {seconds:.1f} s = {images / seconds:.1f} images/s "
            f"(inside the stage, per split: {inside})",
            flush=True,
        )


def peak_rss_mib(voc: Path, limit: int) -> float | None:
    """Peak RSS (MiB) of a child process that extracts `limit` images (resnet18)."""
    if not Path("/usr/bin/time").exists():
        return None
    command = ["/usr/bin/time", "-v", sys.executable, __file__, "--voc", str(voc)]
    command += ["--limit", str(limit), "--rss-probe", str(limit)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=True)
    kib = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    return int(kib.group(1)) / 1024 if kib else None


def against_revision(
    revision: str, voc: Path, backbones: list[str], limit: int, batch_size: int, rounds: int
) -> None:
    """The stage's path end to end (`extract_features`) of `revision` and of this tree, side by
    side: alternating processes, each importing its own pipeline_lib (the revision's from `git
    archive`), the precision `auto` picks here; best of `rounds` each."""
    print(f"machine: {os.cpu_count()} CPU cores, flags {cpu_flags()}, torch {torch.__version__}")
    precision = pick_precision("auto", torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", revision, "pipeline_lib"],
            capture_output=True,
            check=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        trees = {revision: tmp, "this tree": str(REPO)}
        for name in backbones:
            rates: dict[str, list[float]] = {label: [] for label in trees}
            for _ in range(rounds):
                for label, tree in trees.items():
                    command = [sys.executable, __file__, "--voc", str(voc), "--limit", str(limit)]
                    command += ["--batch-size", str(batch_size), "--probe", f"{name}:{precision}"]
                    env = dict(os.environ, PYTHONPATH=tree)
                    done = subprocess.run(command, capture_output=True, text=True, env=env)
                    if done.returncode:
                        raise SystemExit(f"{label}: {done.stderr}")
                    rate, module = done.stdout.split()
                    assert module.startswith(tree), f"{label} imported {module}"
                    rates[label].append(float(rate))
            runs = "; ".join(
                f"{label} {', '.join(f'{r:.1f}' for r in found)} (best {max(found):.1f})"
                for label, found in rates.items()
            )
            print(f"{name} at {SIZES.get(name, 224)}, {precision}, end to end img/s: {runs}")


def main(
    voc: Path = REPO.parent / "shared/voc/VOCdevkit/VOC2007",
    backbones: str = "resnet18,efficientnet_lite0",
    limit: int = 765,
    batch_size: int = 16,
    rounds: int = 2,
    precisions: str = "float32,bfloat16",
    compile: bool = False,
    rss_probe: int = 0,
    against: str = "",
    probe: str = "",
) -> None:
    if not (voc / "JPEGImages").is_dir():
        raise SystemExit(f"no VOC folder at {voc} (pass --voc)")
    paths, ids = voc_images(voc, limit)
    chosen = precisions.split(",")
    if probe:  # child process of against_revision: one end-to-end run of this PYTHONPATH's code
        name, precision = probe.split(":")
        backbone = load_backbone(name, None, "imagenet" if "lite" in name else "random")
        settings = ExtractSettings(batch_size=batch_size, device="cpu", precision=precision)
        rate = end_to_end(backbone, paths, ids, SIZES.get(name, 224), settings)
        print(f"{rate:.2f} {extraction.__file__}")
        return
    if against:
        against_revision(against, voc, backbones.split(","), limit, batch_size, rounds)
        return
    if rss_probe:  # child process of peak_rss_mib
        backbone = load_backbone("resnet18", None, "random")
        end_to_end(
            backbone,
            paths[:rss_probe],
            ids[:rss_probe],
            224,
            ExtractSettings(batch_size=batch_size),
        )
        return

    torch.set_num_threads(os.cpu_count() or 1)
    device = pick_device("auto", "--device")
    auto = pick_precision("auto", device)
    print(
        f"machine: {os.cpu_count()} CPU cores, flags {cpu_flags()}, torch {torch.__version__}, "
        f"float32 matmul {matmul_gflops():.0f} GFLOP/s; the stage's device {device}, "
        f"backbone.precision auto -> {auto}; {len(paths)} VOC photos"
    )
    decoding(paths, sorted({SIZES.get(name, 224) for name in backbones.split(",")}))
    for name in backbones.split(","):
        backbone_rows(name, paths, ids, chosen, batch_size, rounds, compile)
    core_split(paths, ids, auto if auto in chosen else chosen[0], batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        whole_stage(voc, Path(tmp), chosen)

    small, large = 96, len(voc_images(voc, 10**6)[0])
    rss = [peak_rss_mib(voc, n) for n in (small, large)]
    if None in rss:
        print("peak RSS: /usr/bin/time not available")
    else:
        print(
            f"\npeak RSS (resnet18 extraction, /usr/bin/time -v): {small} images {rss[0]:.0f} MiB, "
            f"{large} images {rss[1]:.0f} MiB"
        )


if __name__ == "__main__":
    typer.run(main)
