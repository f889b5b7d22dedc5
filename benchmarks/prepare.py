"""Benchmark the prepare side: annotation parsing on genuine VOC, and synthetic generation.

    .venv/bin/python benchmarks/prepare.py [--voc PATH/TO/VOC2007] [--synthetic 3000]

Prints annotation files parsed per second (full parse + image header check, as `prepare` does) and
the projected time for VOC2012's 11,540 trainval files (goal: under 30 s on 2 cores), then the
synthetic generator's images per second (goal: a few thousand images well under a minute).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from pathlib import Path

import typer

from pipeline_lib.base.params import load_params
from pipeline_lib.data.synthetic import generate_dataset
from pipeline_lib.data.voc import VOC_CLASSES, read_voc

REPO = Path(__file__).resolve().parents[1]
VOC2012_FILES = 11_540


def main(
    voc: Path = REPO.parent / "shared/voc/VOCdevkit/VOC2007",
    repeats: int = 3,
    synthetic: int = 3000,
) -> None:
    if (voc / "Annotations").is_dir():
        read_voc(voc, {"all": "trainval"}, VOC_CLASSES, progress=False)  # warm the file cache
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            rows = read_voc(voc, {"all": "trainval"}, VOC_CLASSES, progress=False)
            best = min(best, time.perf_counter() - start)
        rate = len(rows.images) / best
        projected = VOC2012_FILES / rate
        print(
            f"voc parse: {len(rows.images)} files in {best:.2f} s = {rate:,.0f} files/s "
            f"(best of {repeats}); VOC2012 trainval ({VOC2012_FILES:,} files) ~ {projected:.1f} s "
            "(goal < 30 s)"
        )
    else:
        print(f"voc parse: skipped, no VOC folder at {voc}")

    if synthetic:
        params = load_params(REPO / "params.yaml").data.synthetic
        params = dataclasses.replace(params, n_train=synthetic, n_val=1)
        workers = os.cpu_count() or 1
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            generate_dataset(Path(tmp) / "d", params, workers=workers, progress=False)
            elapsed = time.perf_counter() - start
        n = params.n_train + params.n_val
        print(
            f"synthetic: {n} images in {elapsed:.1f} s = {n / elapsed:,.0f} images/s "
            f"({workers} workers; goal: a few thousand well under 60 s)"
        )


if __name__ == "__main__":
    typer.run(main)
