"""Benchmark the bootstrap of the evaluations' intervals on a large val set.

    .venv/bin/python benchmarks/bootstrap.py [--images 5000] [--classes 20] [--draws 1000]
        [--detections 20] [--rounds 2]

Makes per-image records of a grid head without any model (records.multi_records: every object
of a random 2-4 per image found by a jittered box, false positives around them and elsewhere,
`--detections` per image in all), then times what the evaluate stage computes on them: the
interval of mAP@0.5 and COCO mAP over `--draws` draws of the images (records.figure_draws with
bootstrap.image_weights), mAP@0.5 alone, and the report's paired comparison of two such runs
(review.judge). The matching itself (records.multi_records, once per evaluation) is timed
apart. The CPU's flags and torch's threads are printed first.
"""

from __future__ import annotations

import os
import time

import pandas as pd
import torch
import typer
from workfolder import cpu_flags

from pipeline_lib.measures.bootstrap import image_weights, interval, map_draws, ranked_classes
from pipeline_lib.measures.metrics import COCO_RECALLS  # noqa: F401 (documented: COCO's 101 points)
from pipeline_lib.measures.records import Judging, multi_records
from pipeline_lib.reporting.review import judge


def synthetic_images(n_images: int, n_classes: int, per_image: int, seed: int):
    """Objects and detections in 500 x 375 photos: each object found by a jittered box (IoU
    mostly 0.4-0.9), the rest false positives, scores higher for the better boxes."""
    g = torch.Generator().manual_seed(seed)
    found, truth = [], []
    for _ in range(n_images):
        n = int(torch.randint(2, 5, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * torch.tensor([400.0, 280.0])
        wh = 20 + torch.rand(n, 2, generator=g, dtype=torch.float64) * 80
        boxes = torch.cat([xy, xy + wh], 1)
        labels = torch.randint(0, n_classes, (n,), generator=g)
        extra = per_image - n
        near = boxes[torch.randint(0, n, (extra,), generator=g)]
        moved = torch.cat([boxes, near]) + (torch.rand(per_image, 4, generator=g) - 0.5) * 40
        moved[:, 2:] = torch.maximum(moved[:, 2:], moved[:, :2] + 2)
        k = torch.cat([labels, torch.randint(0, n_classes, (extra,), generator=g)])
        scores = torch.rand(per_image, generator=g, dtype=torch.float64)
        scores[:n] = 0.5 + scores[:n] / 2
        found.append((moved, scores, k))
        truth.append((boxes, labels, torch.rand(n, generator=g) < 0.1))
    return found, truth


def main(
    images: int = 5000,
    classes: int = 20,
    draws: int = 1000,
    detections: int = 20,
    rounds: int = 2,
) -> None:
    print(
        f"machine: {os.cpu_count()} CPU cores, flags {cpu_flags()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); {images} val images x {classes} classes, "
        f"{detections} detections per image, {draws} draws"
    )
    names = [f"class{k}" for k in range(classes)]
    rows = pd.DataFrame({"image_id": [f"{i:06d}" for i in range(images)], "path": "x.jpg"})
    rows["width"], rows["height"] = 500, 375
    judging = Judging(0.5, "voc_inclusive_pixels", 0.2)
    runs = []
    for seed in (0, 1):
        found, truth = synthetic_images(images, classes, detections, seed=0)
        if seed:  # the second run: every score moved a little, a few boxes worse
            g = torch.Generator().manual_seed(seed)
            found = [
                (b, (s + torch.rand(len(s), generator=g) * 0.2).clamp(max=1), k)
                for b, s, k in found
            ]
        start = time.perf_counter()
        runs.append(multi_records(rows, found, truth, names, judging, "."))
        print(f"matching (records.multi_records), run {seed}: {time.perf_counter() - start:.1f} s")
    weights = image_weights(images, draws, seed=0)
    for r in range(rounds):
        start = time.perf_counter()
        figures = runs[0].figure_draws(weights)
        both = time.perf_counter() - start
        bounds = {name: interval(v, 0.95) for name, v in figures.items()}
        d = runs[0].detections
        index = {i: n for n, i in enumerate(rows["image_id"])}
        start = time.perf_counter()
        ranked = ranked_classes(
            torch.tensor(d["score"].to_numpy()),
            torch.tensor(d["class_id"].to_numpy()).long(),
            torch.tensor(d["image_id"].map(index).to_numpy()),
            torch.tensor(d["outcome"].to_numpy())[:, None],
            runs[0]._positives(index),
        )
        map_draws(ranked, weights)
        alone = time.perf_counter() - start
        start = time.perf_counter()
        judged = judge(runs[:1], runs[1:], draws, 0.95)
        paired = time.perf_counter() - start
        print(
            f"round {r + 1}: intervals of mAP@0.5 and COCO mAP {both:.2f} s; mAP@0.5 alone "
            f"{alone:.2f} s; the report's paired comparison of two runs (both figures) "
            f"{paired:.2f} s"
        )
    print("intervals:", {k: (round(lo, 4), round(hi, 4)) for k, (lo, hi) in bounds.items()})
    print("change:", {j.figure: (round(j.change.low, 4), round(j.change.high, 4)) for j in judged})


if __name__ == "__main__":
    typer.run(main)
