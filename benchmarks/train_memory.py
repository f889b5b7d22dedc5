"""Peak memory and s/epoch of grid-head training as the number of images grows, features in RAM
(train.features: memory, the default) against read from disk batch by batch (disk).

    .venv/bin/python benchmarks/train_memory.py [--sizes 1000,10000,50000] [--work /tmp/bench]

For each size a feature file of the default's shape (Lite0's last block at 448: 320 x 14 x 14,
float16, 125 KB an image; random values: only shape and bytes matter here) is written once, then
each mode trains the conv grid head (ConvGridHead, width 128, depth 2, 20 classes, CIoU and
focal loss) for one epoch on it, in a fresh process, from which the peak resident memory
(ru_maxrss) and the epoch's seconds are printed side by side. Targets (4.7 KB an image) are random
and in memory in both modes. The CPU's flags are printed first; compare only figures of one run.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer
from workfolder import cpu_flags

SHAPE = (320, 14, 14)  # the default features: Lite0 `blocks` at image.size 448
CLASSES = 20
CHUNK = 500  # rows generated and written at a time


def write_features(path: Path, count: int) -> None:
    """A feature file of `count` random rows, written in chunks (memory stays at one chunk)."""
    from pipeline_lib.features.featurefiles import write_feature_file

    rng = np.random.default_rng(0)
    chunk = rng.standard_normal((CHUNK, *SHAPE), dtype=np.float32).astype(np.float16)
    raw = path.with_suffix(".rows")
    with open(raw, "wb") as sink:
        for start in range(0, count, CHUNK):
            sink.write(chunk[: min(CHUNK, count - start)].tobytes())
    ids = json.dumps([f"{i:06d}" for i in range(count)])
    metadata = {"image_ids": ids, "backbone": json.dumps({"name": "random"})}
    write_feature_file(path, raw, (count, *SHAPE), torch.float16, metadata)
    raw.unlink()


def child(path: Path, mode: str) -> None:
    """Train one epoch on `path` and print {"rss_mib", "seconds"} as JSON."""
    from pipeline_lib.features.featurefiles import read_features
    from pipeline_lib.measures.metrics import multi_object_batch_sums
    from pipeline_lib.models.heads import ConvGridHead
    from pipeline_lib.models.losses import LossWeights, Objective, grid_loss
    from pipeline_lib.training.loop import Dataset, TrainConfig, fit

    torch.manual_seed(0)
    rows = read_features(path, lazy=mode == "disk").features
    n, s = len(rows), 14
    boxes = torch.rand(n, 4, s, s) * 0.4 + 0.1
    has_obj = (torch.rand(n, s, s) < 0.015).float()
    labels = torch.randint(0, CLASSES, (n, s, s))
    val_rows = torch.arange(min(n, 200))
    val_features = rows.select(val_rows) if mode == "disk" else rows[:200]
    train = Dataset(rows, (boxes, has_obj, labels))
    val = Dataset(val_features, (boxes[:200], has_obj[:200], labels[:200]))
    weights = LossWeights(obj_loss="focal", box_loss="ciou", obj_target="iou")
    objective = Objective(lambda o, t: grid_loss(o, t, weights), multi_object_batch_sums)
    head = ConvGridHead(SHAPE, CLASSES, num_cells=s, width=128, depth=2)
    config = TrainConfig(1, 64, 1e-3, 0.0, "cosine", 0, "last", "cpu")
    start = time.perf_counter()
    fit(head, train, val, objective, config, progress=False)
    seconds = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"rss_mib": round(rss), "seconds": round(seconds, 1)}))


def main(
    sizes: str = "1000,10000,50000",
    work: Path | None = None,
    child_file: Annotated[Path | None, typer.Option(hidden=True)] = None,
    child_mode: Annotated[str, typer.Option(hidden=True)] = "memory",
) -> None:
    if child_file is not None:
        child(child_file, child_mode)
        return
    folder = Path(work or tempfile.mkdtemp(prefix="train_memory_"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"CPU flags: {cpu_flags()}; {torch.get_num_threads()} threads; features {SHAPE} float16")
    print("| images | file | memory: peak RSS | memory: s/epoch | disk: peak RSS | disk: s/epoch |")
    print("|---|---|---|---|---|---|")
    for count in (int(n) for n in sizes.split(",")):
        path = folder / f"features_{count}.safetensors"
        if not path.is_file():
            write_features(path, count)
        figures = {}
        for mode in ("memory", "disk"):
            command = [sys.executable, __file__, "--child-file", str(path), "--child-mode", mode]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            figures[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        m, d = figures["memory"], figures["disk"]
        print(
            f"| {count:,} | {path.stat().st_size / 2**30:.2f} GiB | {m['rss_mib']:,} MiB | "
            f"{m['seconds']} | {d['rss_mib']:,} MiB | {d['seconds']} |",
            flush=True,
        )
        path.unlink()


if __name__ == "__main__":
    typer.run(main)
