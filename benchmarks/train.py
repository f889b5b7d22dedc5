"""Benchmark single-object training on the genuine VOC2007 subset (train 579 / val 186 images).

    .venv/bin/python benchmarks/train.py [--voc PATH/TO/VOC2007] [--epochs 3]

Extracts the default backbone's features (EfficientNet-Lite0, shrink 224) for the subset once, into
a temporary folder, then for each classifier (pooled, flatten) times `--epochs` epochs of the
default head and params and prints seconds per epoch, its extrapolation to VOC2012's 5,717
training images, and the peak RSS of a child process that loads the features and trains (via
/usr/bin/time -v).
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch
import typer

from pipeline_lib.base.params import load_params
from pipeline_lib.boxes.geometry import ImageSpec
from pipeline_lib.data.voc import VOC_CLASSES, read_voc
from pipeline_lib.features.backbones import load_backbone
from pipeline_lib.features.extraction import ExtractSettings, extract_features
from pipeline_lib.features.featurefiles import read_features
from pipeline_lib.measures.metrics import single_object_batch_sums
from pipeline_lib.models.heads import MlpSingleHead
from pipeline_lib.models.losses import single_object_loss
from pipeline_lib.models.targets import single_object_targets
from pipeline_lib.training.loop import Dataset, TrainConfig, fit, seed_everything

REPO = Path(__file__).resolve().parents[1]
VOC2012_TRAIN = 5717


def extract(voc: Path, out: Path) -> None:
    rows = read_voc(voc, {"train": "train", "val": "val"}, VOC_CLASSES, progress=False)
    pd.DataFrame(rows.images).to_parquet(out / "images.parquet")
    pd.DataFrame(rows.objects).to_parquet(out / "objects.parquet")
    backbone = load_backbone("efficientnet_lite0", "head", "imagenet")
    for split in ("train", "val"):
        mine = [r for r in rows.images if r["split"] == split]
        paths = [voc / "JPEGImages" / r["filename"] for r in mine]
        ids = [r["image_id"] for r in mine]
        extract_features(
            backbone,
            dict(zip(ids, paths, strict=True)),
            out / f"{split}.safetensors",
            ImageSpec("shrink", 224),
            ExtractSettings(batch_size=16, device="cpu"),
            progress=None,
        )


def train(folder: Path, classifier: str, epochs: int) -> float:
    """Seconds per epoch of the default single-object head and params."""
    params = load_params(REPO / "params.yaml")
    images = pd.read_parquet(folder / "images.parquet")
    objects = pd.read_parquet(folder / "objects.parquet")
    data = {}
    for split in ("train", "val"):
        features = read_features(folder / f"{split}.safetensors")
        t = single_object_targets(images, objects, features.image_ids, ImageSpec("shrink", 224))
        data[split] = Dataset(
            features.features[t.present], (t.boxes[t.present], t.labels[t.present])
        )
    seed_everything(0)
    head = MlpSingleHead(
        tuple(data["train"].features.shape[1:]),
        len(VOC_CLASSES),
        params.head.hidden,
        params.head.dropout,
        classifier,
    )
    p = params.train
    config = TrainConfig(epochs, p.batch_size, p.lr, p.weight_decay, p.lr_schedule, p.seed)

    def loss_fn(outputs, targets):
        return single_object_loss(*outputs, *targets)

    result = fit(
        head, data["train"], data["val"], loss_fn, single_object_batch_sums, config, progress=False
    )
    return result.seconds / epochs


def peak_rss_mib(folder: Path, epochs: int) -> float | None:
    if not Path("/usr/bin/time").exists():
        return None
    command = [
        "/usr/bin/time",
        "-v",
        sys.executable,
        __file__,
        "--features",
        str(folder),
        "--epochs",
        str(epochs),
        "--rss-probe",
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=True)
    kib = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    return int(kib.group(1)) / 1024 if kib else None


def main(
    voc: Path = REPO.parent / "shared/voc/VOCdevkit/VOC2007",
    epochs: int = 3,
    features: Path | None = None,
    rss_probe: bool = False,
) -> None:
    if rss_probe and features:  # child process of peak_rss_mib
        train(features, "pooled", epochs)
        return
    if not (voc / "Annotations").is_dir():
        raise SystemExit(f"no VOC folder at {voc} (pass --voc)")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        extract(voc, folder)
        n_train = len(read_features(folder / "train.safetensors").image_ids)
        print(
            f"torch {torch.__version__}, {torch.get_num_threads()} threads; EfficientNet-Lite0 "
            f"head features (1280 x 7 x 7), {n_train} training images"
        )
        for classifier in ("pooled", "flatten"):
            seconds = train(folder, classifier, epochs)
            print(
                f"  classifier {classifier}: {seconds:.2f} s/epoch (mean of {epochs}) -> "
                f"VOC2012's {VOC2012_TRAIN} training images: "
                f"{seconds * VOC2012_TRAIN / n_train:.0f} s/epoch"
            )
        rss = peak_rss_mib(folder, 1)
        print(
            "peak RSS: /usr/bin/time not available"
            if rss is None
            else f"peak RSS of training (pooled, features in RAM): {rss:.0f} MiB"
        )


if __name__ == "__main__":
    typer.run(main)
