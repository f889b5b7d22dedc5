"""The GPU check: the whole default chain on a GPU, then where extraction's time goes there.

    make gpu-check                       # = .venv/bin/python benchmarks/gpu_check.py
    .venv/bin/python benchmarks/gpu_check.py [--device auto|cuda|cpu] [--voc PATH/TO/VOC2007]
        [--limit N (images per split, 0: all)] [--finetune-epochs 30] [--decodes 20000]
        [--backbones efficientnet_lite0,resnet50] [--size 0 (each backbone's own)] [--batch 64]
        [--set group.key=value ...] [--work DIR] [--out gpu_check.md]

1. The chain, as a user runs it: every stage through its real script (`python -m stages.…`, the
   default params but for the data: the VOC2007 subset beside the clone, train 579 / val 186,
   read through links in a work folder), fine-tuning with the GPU recipe (finetune.unfreeze 3,
   batch 32, `--finetune-epochs`), then `predict` on three val photos with the fine-tuned model.
   Each stage's status, seconds and figures (images/s, s/epoch, accuracy, mAP) go in one table.
2. Extraction at steady state, per backbone (Lite0 at 448 with its package's weights, resnet50 at
   224 with random weights: no download), on `--decodes` decodes of the photos (listed again and
   again): the model alone on uint8 batches in NCHW and in channels_last, decoding alone (the
   stage's DataLoader), and the stage's path end to end (`extract_features`), its worker start-up
   timed apart and its time split by part (decoding, backbone, writing). The ratio the goal is
   about: end to end at steady state / model alone in channels_last.
Needs no internet. Runs on a CPU too (`--device cpu`, with small settings: the suite's smoke run).
Prints the tables and writes them, with the machine's description, to `--out`.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
import typer
import yaml
from torch.utils.data import DataLoader
from workfolder import REPO, cpu_flags, write_params

from pipeline_lib.boxes.geometry import ImageSpec
from pipeline_lib.features.backbones import load_backbone
from pipeline_lib.features.devices import pick_device, pick_precision, pick_workers, prepare_model
from pipeline_lib.features.extraction import ExtractSettings, extract_features
from pipeline_lib.features.images import ImageFolder, collate_decoded

SHARED_VOC = REPO.parent / "shared" / "voc" / "VOCdevkit" / "VOC2007"
SIZES = {"efficientnet_lite0": 448, "resnet50": 224}
# Lite0's weights come with its package; torchvision's would be downloaded: random ones instead
# (the speed is the same).
WEIGHTS = {"efficientnet_lite0": "imagenet", "resnet50": "random"}
# The GPU recipe (README, "GPUs"): fine-tuning the last three units with the grid head.
RECIPE = {"finetune.enabled": True, "finetune.unfreeze": 3, "finetune.batch_size": 32}


@dataclass
class Row:
    stage: str
    status: str
    seconds: float = 0.0
    figures: str = ""


def link_voc(voc: Path, folder: Path, limit: int) -> Path:
    """A VOCdevkit in `folder` whose VOC2007 links to `voc`'s photos and annotations, with its
    train and val lists (their first `limit` ids each, 0: all). Returns the VOCdevkit."""
    dataset = folder / "VOCdevkit" / "VOC2007"
    (dataset / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    for sub in ("Annotations", "JPEGImages"):
        if not (dataset / sub).exists():
            (dataset / sub).symlink_to(voc / sub, target_is_directory=True)
    for split in ("train", "val"):
        ids = (voc / "ImageSets" / "Main" / f"{split}.txt").read_text().split()
        ids = ids[:limit] if limit else ids
        (dataset / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return dataset.parent


def run_stage(folder: Path, *args: str) -> tuple[bool, str, float]:
    """`python -m stages.<args>` in `folder`: (succeeded, its output, seconds)."""
    command = [sys.executable, "-m", f"stages.{args[0]}", *args[1:]]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    start = time.perf_counter()
    done = subprocess.run(command, cwd=folder, capture_output=True, text=True, env=env)
    return done.returncode == 0, done.stdout + done.stderr, time.perf_counter() - start


def read(folder: Path, name: str) -> dict:
    path = folder / "reports" / name
    return json.loads(path.read_text()) if path.is_file() else {}


def figures_of(stage: str, folder: Path) -> str:
    """What a stage's reports say, in a few words."""
    if stage == "prepare":
        splits = read(folder, "prepare/metrics.json")
        return " / ".join(f"{s['images']} {name}" for name, s in splits.items()) + " images"
    if stage == "extract":
        report = read(folder, "extract/report.json")
        parts = []
        for name, split in report["splits"].items():
            where = ", ".join(f"{k} {v:.1f}" for k, v in split["seconds_by_part"].items())
            parts.append(f"{name} {split['images_per_second']:,.0f} images/s ({where} s)")
        return f"{report['precision']}: " + "; ".join(parts)
    if stage.startswith("train") or stage == "finetune":
        name = "finetune" if stage == "finetune" else f"train_{stage.split()[1]}"
        metrics = read(folder, f"{name}/metrics.json")
        epoch = metrics.get("best_epoch") or metrics["best"]["epoch"]
        return f"{metrics['seconds_per_epoch']} s/epoch, epoch {epoch} kept"
    if stage == "evaluate single":
        m = read(folder, "evaluate_single/metrics.json")
        return f"accuracy {m['accuracy']:.3f}, mean IoU {m['mean_iou']:.3f}"
    if stage == "evaluate multi":
        m = read(folder, "evaluate_multi/metrics.json")
        return f"mAP@0.5 {m['map']:.3f} (COCO mAP {m['coco_map']:.3f})"
    if stage == "evaluate finetune":
        m = read(folder, "evaluate_finetune/metrics.json")
        return f"mAP@0.5 {m['map_frozen']:.3f} frozen -> {m['map']:.3f} ({m['gain']:+.3f})"
    return ""


def chain(folder: Path, device: str, photos: list[Path]) -> list[Row]:
    """Every stage of the default chain, in order; a stage whose input failed is skipped."""
    steps = {
        "prepare": (("prepare",), None),
        "extract": (("extract",), "prepare"),
        "train single": (("train", "single", "--no-progress"), "extract"),
        "evaluate single": (("evaluate", "single"), "train single"),
        "train multi": (("train", "multi", "--no-progress"), "extract"),
        "evaluate multi": (("evaluate", "multi"), "train multi"),
        "finetune": (("finetune", "train", "--no-progress"), "train multi"),
        "evaluate finetune": (("finetune", "evaluate"), "finetune"),
    }
    predict = ("predict", *map(str, photos), "--model", "models/finetuned/model.safetensors")
    steps[f"predict ({len(photos)} photos)"] = (
        (*predict, "--device", device, "--out", "predictions", "--no-progress"),
        "finetune",
    )
    rows: dict[str, Row] = {}
    for name, (args, needs) in steps.items():
        if needs and rows[needs].status != "ok":
            rows[name] = Row(name, f"skipped ({needs} failed)")
            continue
        typer.echo(f"-- {name}", err=True)
        ok, output, seconds = run_stage(folder, *args)
        if not ok:
            errors = [line for line in output.splitlines() if line.startswith("error")]
            last = (errors or output.strip().splitlines() or ["no output"])[-1]
            rows[name] = Row(name, f"failed: {last[:200]}", round(seconds, 1))
            typer.echo(output, err=True)
            continue
        figures = figures_of(name, folder) if not name.startswith("predict") else output.strip()
        rows[name] = Row(name, "ok", round(seconds, 1), figures.splitlines()[-1] if figures else "")
    return list(rows.values())


def timed(device: torch.device, work) -> float:
    """Seconds `work()` takes, the device's queue drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def nchw_forward(backbone, device: torch.device, precision: str):
    """The model function as the stage ran it on a GPU before channels_last: NCHW throughout."""
    model = backbone.module.to(device).eval().to(memory_format=torch.contiguous_format)
    mean, std = (
        torch.tensor(v, device=device).view(1, 3, 1, 1) * 255 for v in (backbone.mean, backbone.std)
    )
    bf16 = precision == "bfloat16"

    @torch.inference_mode()
    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            return model((x.float() - mean) / std).float()

    return forward


def model_only(name: str, size: int, device, precision: str, batch: int, layout: str) -> float:
    """Images/s of the model function (`layout` channels_last: the stage's) on uint8 batches
    already on the device."""
    backbone = load_backbone(name, weights=WEIGHTS[name])
    if layout == "channels_last":
        forward = prepare_model(backbone, device, precision=precision)
    else:
        forward = nchw_forward(backbone, device, precision)
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    timed(device, lambda: [forward(x) for _ in range(3)])  # warm-up: kernels chosen, caches
    rounds = max(3, min(50, int(2.0 / max(timed(device, lambda: forward(x)), 1e-3))))
    return rounds * batch / timed(device, lambda: [forward(x) for _ in range(rounds)])


def decoding_only(paths: list[Path], spec: ImageSpec, batch: int, workers: int, device):
    """(start-up seconds, images/s after it) of the stage's DataLoader alone."""
    loader = DataLoader(
        ImageFolder(paths, spec.mode, spec.size),
        batch_size=batch,
        num_workers=workers,
        collate_fn=collate_decoded,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
    )
    start = time.perf_counter()
    batches = iter(loader)
    first = len(next(batches)[0])
    started = time.perf_counter()
    rest = sum(len(indices) for indices, _, _ in batches)
    return started - start, rest / max(time.perf_counter() - started, 1e-9), first + rest


def steady_state(name: str, size: int, photos: list[Path], decodes: int, device, batch: int):
    """One backbone's row of the extraction table (see the module's docstring)."""
    spec, precision = ImageSpec("shrink", size), pick_precision("auto", device)
    paths = (photos * (decodes // len(photos) + 1))[:decodes]
    workers = pick_workers("auto", device)
    nchw = model_only(name, size, device, precision, batch, "NCHW")
    last = model_only(name, size, device, precision, batch, "channels_last")
    startup, decoded, _ = decoding_only(paths, spec, batch, workers, device)
    backbone = load_backbone(name, weights=WEIGHTS[name])
    settings = ExtractSettings("float16", batch, device.type, precision, workers=workers)
    images = {f"{k}": path for k, path in enumerate(paths)}
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "features.safetensors"
        result = extract_features(backbone, images, out, spec, settings, progress=None)
    parts = result.parts
    steady = (len(paths) - batch) / max(result.seconds - parts["startup"], 1e-9)
    where = ", ".join(f"{k} {v:.1f}" for k, v in parts.items())
    return {
        "backbone": f"{name} at {size} ({precision})",
        "model NCHW": f"{nchw:,.0f}",
        "model channels_last": f"{last:,.0f}",
        f"decoding ({workers} workers)": f"{decoded:,.0f} (start-up {startup:.1f} s)",
        "stage end to end": f"{steady:,.0f} ({len(paths)} images; {where} s)",
        "end to end / channels_last": f"{steady / last:.0%}",
    }


def markdown(rows: list[dict]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(row[k]) for k in header) + " |" for row in rows]
    return "\n".join(lines)


def machine(device: torch.device) -> str:
    gpu = "no GPU"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu = f"{props.name} ({props.total_memory / 2**30:.0f} GiB, sm {props.major}.{props.minor})"
    return (
        f"{time.strftime('%Y-%m-%d')}: {gpu}; {os.cpu_count()} CPU cores ({platform.machine()}, "
        f"flags {cpu_flags()}); torch {torch.__version__}, Python {platform.python_version()}"
    )


def main(
    device: str = "auto",
    voc: Path = SHARED_VOC,
    limit: int = 0,
    finetune_epochs: int = 30,
    decodes: int = 20_000,
    backbones: str = ",".join(SIZES),
    size: int = 0,
    batch: int = 64,
    set_: Annotated[list[str] | None, typer.Option("--set")] = None,
    work: Path | None = None,
    out: Path = Path("gpu_check.md"),
) -> None:
    """Run the chain and the extraction benchmark on this machine's GPU (see the docstring)."""
    chosen = pick_device(device, "--device")
    if not (voc / "Annotations").is_dir():
        raise SystemExit(f"no VOC2007 folder at {voc} (--voc)")
    folder = Path(work or tempfile.mkdtemp(prefix="gpu_check_"))
    link_voc(voc, folder, limit)
    changes = {"data.source": "voc", "data.root": "VOCdevkit", "data.year": 2007} | RECIPE
    changes |= {f"{group}.device": chosen.type for group in ("backbone", "train", "finetune")}
    changes["finetune.epochs"] = finetune_epochs
    for item in set_ or []:
        key, _, value = item.partition("=")
        changes[key] = yaml.safe_load(value)
    write_params(folder, changes)
    typer.echo(f"{machine(chosen)}\nwork folder {folder}", err=True)
    val = (folder / "VOCdevkit/VOC2007/ImageSets/Main/val.txt").read_text().split()
    photos = [voc / "JPEGImages" / f"{image_id}.jpg" for image_id in val[:3]]
    start = time.perf_counter()
    stages = [vars(row) for row in chain(folder, chosen.type, photos)]
    every = sorted((voc / "JPEGImages").glob("*.jpg"))
    speed = [
        steady_state(name, size or SIZES.get(name, 224), every, decodes, chosen, batch)
        for name in backbones.split(",")
    ]
    report = (
        f"# GPU check\n\n{machine(chosen)}\n\nThe chain ({voc}, params changed: "
        f"{', '.join(f'{k}={v}' for k, v in changes.items())}):\n\n{markdown(stages)}\n\n"
        f"Extraction, images/s at steady state (batch {batch}):\n\n{markdown(speed)}\n\n"
        f"{time.perf_counter() - start:.0f} s in all.\n"
    )
    out.write_text(report)
    typer.echo(report)
    if any(row["status"] != "ok" for row in stages):
        raise SystemExit(1)


if __name__ == "__main__":
    typer.run(main)
