"""Measure the rows of docs/ablations.md on the genuine VOC2007 subset, several seeds each.

    .venv/bin/python benchmarks/ablations.py [--voc PATH/TO/VOCdevkit] [--work FOLDER]
        [--seeds 0 --seeds 1] [--row focal ...] [--finetune] [--synthetic] [--folds 3]
        [--judge default]

Protocol (docs/ablations.md): train on the subset's 579 `train` images, evaluate on its 186 `val`
images (`--synthetic`: the embedded synthetic default's 800 and 200), EfficientNet-Lite0 at 224
(shrink), 7x7 grid, the lab's head and training (LAB: the former default) but 30
epochs; rows named "448: ..." on 448x448 features (14x14 maps, 14x14 grid) with today's defaults
(20 epochs) but the row's params; rows named "single: ..." train and evaluate the single head.
With `--folds K` the subset's 765 photos (its train and val together) are dealt into K parts, once
(seed 0), and each row runs K times per seed, each part the val images once and the others the
training images: every photo is judged once per seed, and the row's figure is the mean over folds
and seeds (`fold_dataset`). Every run is the real stages in a working folder (`python -m
stages.prepare`, `extract` once per feature setting (and fold), then `train` and `evaluate` per
row and seed), so the figures are exactly what
`dvc exp run -S ...` gives. Besides the stage's metrics (VOC mAP with the devkit's inclusive-pixel
overlap), each grid run's mAP@0.5 is also computed with the continuous IoU used formerly,
on the same model and detections. Results go to `<work>/results.jsonl` (one line per run; runs
already there are not repeated) and a summary per row is printed: the mean and the runs in
brackets. Each run's per-image records (the evaluate stage's) are kept in `<work>/records/`;
`--judge ROW` then judges every other row against ROW as the report judges a change (the paired
bootstrap over the photos and the seeds both rows have, `review.judge`), a row's folds pooled into
one set of records: every photo of the subset judged once per seed.
"""

from __future__ import annotations

import json
import random
import shutil
import statistics
from dataclasses import fields, replace
from pathlib import Path

import pandas as pd
import typer
from workfolder import REPO, stage, write_params

# The lab's grid head and training, the former default (224 x 224, 7 x 7 grid).
LAB = {
    "backbone.layer": "head",
    "head.dropout": 0.5,
    "grid.num_cells": 7,
    "grid.assign": "centre",
    "head.grid_kind": "lab",
    "train.lr_schedule": "constant",
    "train.monitor": "box_loss_plus_error",
    "train.box_loss": "smooth_l1",
    "train.obj_target": "binary",
    "train.epochs": 30,
}
# The conv heads read head.dropout since the third step; every conv row before it ran without.
NO_DROPOUT = {"head.dropout": 0.0}
CONV = {**LAB, **NO_DROPOUT, "train.obj_loss": "focal", "head.grid_kind": "conv"}
CONV |= {"head.conv_width": 256, "head.conv_depth": 3}  # measured before the 1x1 stem
# The conv head on 14 x 14 maps, one lever at a time up to today's default (20 epochs).
CONV14 = {
    **NO_DROPOUT,
    "grid.num_cells": 14,
    "head.grid_kind": "conv",
    "grid.assign": "centre",
    "train.box_loss": "smooth_l1",
    "train.obj_target": "binary",
}
# Every row but "default" ran on the defaults of its time, when the grid head was the conv head:
# each row's params go on top of these, so that a later change of params.yaml does not change what
# a row measures. "default" alone follows params.yaml (FCOS on one level since issue 39).
CONV_ERA = {
    "head.grid_kind": "conv",
    "head.tower_width": 128,
    "head.tower_depth": 2,
    "train.warmup_epochs": 0.0,
}
ROWS = {  # name -> (feature setting, params on top of CONV_ERA)
    "baseline (bce)": ("default", {**LAB, "train.obj_loss": "bce"}),
    "focal": ("default", {**LAB, "train.obj_loss": "focal"}),
    "3 anchors": ("default", {**LAB, "train.obj_loss": "focal", "grid.anchors": 3}),
    "5 anchors": ("default", {**LAB, "train.obj_loss": "focal", "grid.anchors": 5}),
    "second level": ("fine", {**LAB, "train.obj_loss": "focal"}),
    "conv head": ("default", CONV),
    "conv head, cosine": ("default", {**CONV, "train.lr_schedule": "cosine"}),
    "conv head, cosine, last epoch": (
        "default",
        {**CONV, "train.lr_schedule": "cosine", "train.monitor": "last"},
    ),
    "448: conv head, one cell, SmoothL1": ("448", CONV14),
    "448: + neighbour cells": ("448", {**CONV14, "grid.assign": "neighbours"}),
    "448: + CIoU box loss": (
        "448",
        {**CONV14, "grid.assign": "neighbours", "train.box_loss": "ciou"},
    ),
    "448: + IoU objectness (the default)": ("448", NO_DROPOUT),
    # further levers, each on top of the default
    "448: 40 epochs": ("448", {**NO_DROPOUT, "train.epochs": 40}),
    "448: blocks features (320 ch, before conv_head)": ("448 blocks", NO_DROPOUT),
    "448: weight EMA 0.99": ("448", {**NO_DROPOUT, "train.ema_decay": 0.99}),
    # third step: on the blocks features, one lever at a time (no dropout unless the row says)
    "blocks: dropout 0.1 after the trunk": ("448 blocks", {**NO_DROPOUT, "head.dropout": 0.1}),
    "blocks: dropout 0.3 after the trunk": ("448 blocks", {**NO_DROPOUT, "head.dropout": 0.3}),
    "blocks: trunk 96 wide": ("448 blocks", {**NO_DROPOUT, "head.conv_width": 96}),
    "blocks: weight EMA 0.9": ("448 blocks", {**NO_DROPOUT, "train.ema_decay": 0.9}),
    "blocks: 40 epochs": ("448 blocks", {**NO_DROPOUT, "train.epochs": 40}),
    "blocks: Lite1 backbone": ("448 blocks lite1", NO_DROPOUT),
    # the fourth step: anchors, a pyramid and flips for the default conv head (20 epochs)
    "anchors: 3 per cell": ("448 blocks", {"grid.anchors": 3}),
    "anchors: 5 per cell": ("448 blocks", {"grid.anchors": 5}),
    "anchors: 3 per cell, ratio 2": ("448 blocks", {"grid.anchors": 3, "grid.anchor_ratio": 2.0}),
    "pyramid: blocks.4 below 0.2": ("448 pyramid", {}),
    "pyramid: blocks.4 below 0.1": ("448 pyramid", {"grid.fine_below": 0.1}),
    "pyramid: blocks.4 below 0.3": ("448 pyramid", {"grid.fine_below": 0.3}),
    "fcos: one level": ("448 blocks", {"head.grid_kind": "fcos"}),
    "fcos: two levels": ("448 pyramid", {"head.grid_kind": "fcos"}),
    "fcos: one level, warm-up 1 epoch": (
        "448 blocks",
        {"head.grid_kind": "fcos", "train.warmup_epochs": 1.0},
    ),
    "fcos: one level, lr 0.0003": ("448 blocks", {"head.grid_kind": "fcos", "train.lr": 0.0003}),
    "fcos: two levels, warm-up 1 epoch": (
        "448 pyramid",
        {"head.grid_kind": "fcos", "train.warmup_epochs": 1.0},
    ),
    "fcos: two levels, 64 wide, warm-up 1 epoch": (
        "448 pyramid",
        {"head.grid_kind": "fcos", "head.tower_width": 64, "train.warmup_epochs": 1.0},
    ),
    "fcos: two levels, 64 wide, 1 convolution, warm-up 1 epoch": (
        "448 pyramid",
        {
            "head.grid_kind": "fcos",
            "head.tower_width": 64,
            "head.tower_depth": 1,
            "train.warmup_epochs": 1.0,
        },
    ),
    "fcos: one level, 4 convolutions": (
        "448 blocks",
        {"head.grid_kind": "fcos", "head.tower_depth": 4},
    ),
    "train: batch 16": ("448 blocks", {"train.batch_size": 16}),
    "train: batch 32": ("448 blocks", {"train.batch_size": 32}),
    "train: lr 0.003": ("448 blocks", {"train.lr": 0.003}),
    "train: batch 8": ("448 blocks", {"train.batch_size": 8}),
    "eval: score threshold 0.01": ("448 blocks", {"eval.score_threshold": 0.01}),
    # on batches of 16 (36 optimiser steps an epoch on VOC instead of 9)
    "b16: pyramid, blocks.4 below 0.2": ("448 pyramid", {"train.batch_size": 16}),
    "b16: anchors, 3 per cell": ("448 blocks", {"train.batch_size": 16, "grid.anchors": 3}),
    "b16: flips extracted, 0.5": ("448 hflip", {"train.batch_size": 16, "train.hflip": 0.5}),
    "b16: fcos, two levels": ("448 pyramid", {"train.batch_size": 16, "head.grid_kind": "fcos"}),
    "b16: fcos, two levels, 64 wide, 1 convolution": (
        "448 pyramid",
        {
            "train.batch_size": 16,
            "head.grid_kind": "fcos",
            "head.tower_width": 64,
            "head.tower_depth": 1,
        },
    ),
    "b16: fcos, one level": ("448 blocks", {"head.grid_kind": "fcos"}),
    "b16: fcos, one level, 64 wide, 1 convolution": (
        "448 blocks",
        {"head.grid_kind": "fcos", "head.tower_width": 64, "head.tower_depth": 1},
    ),
    "b16: fcos, one level, 64 wide, 1 convolution, warm-up 1 epoch": (
        "448 blocks",
        {
            "head.grid_kind": "fcos",
            "head.tower_width": 64,
            "head.tower_depth": 1,
            "train.warmup_epochs": 1.0,
        },
    ),
    "b16: fcos, two levels, 64 wide, 1 convolution, 10 epochs": (
        "448 pyramid",
        {
            "head.grid_kind": "fcos",
            "head.tower_width": 64,
            "head.tower_depth": 1,
            "train.epochs": 10,
        },
    ),
    # the conv head, the default until issue 39 (its baseline; with --folds 3 the fold protocol's)
    "conv: the former default": ("448 blocks", {}),
    # today's defaults, as params.yaml has them
    "default": ("448 blocks", {}),
    # torchvision's RetinaNet on the cached levels, beside FCOS and the default
    "b16: retinanet, one level": ("448 blocks", {"head.grid_kind": "retinanet"}),
    "b16: retinanet, two levels": ("448 pyramid", {"head.grid_kind": "retinanet"}),
    "flips: extracted, 0.5": ("448 hflip", {"train.hflip": 0.5}),
    "flips: mirrored maps, 0.5": (
        "448 blocks",
        {"train.hflip": 0.5, "train.hflip_from": "mirrored"},
    ),
    "flips: extracted, 0.5, 40 epochs": ("448 hflip", {"train.hflip": 0.5, "train.epochs": 40}),
    # single-object head (rows named "single ..." train and evaluate the single head)
    "single: the lab's MLP, 224": (
        "default",
        {
            "head.single_kind": "lab",
            "head.dropout": 0.5,
            "train.lr_schedule": "constant",
            "train.monitor": "box_loss_plus_error",
            "train.box_loss": "smooth_l1",
        },
    ),
    "single: spatial head (the default), 448": ("448", NO_DROPOUT),
    "single: blocks features (320 ch)": ("448 blocks", NO_DROPOUT),
    "single: blocks, dropout 0.1": ("448 blocks", {**NO_DROPOUT, "head.dropout": 0.1}),
    "single: blocks, dropout 0.3": ("448 blocks", {**NO_DROPOUT, "head.dropout": 0.3}),
    "single: blocks, trunk 96 wide": ("448 blocks", {**NO_DROPOUT, "head.conv_width": 96}),
    "single: blocks, Lite1 backbone": ("448 blocks lite1", NO_DROPOUT),
    "single: flips extracted, 0.5": ("448 hflip", {"train.hflip": 0.5}),
    "single: batch 16": ("448 blocks", {"train.batch_size": 16}),
    "single: batch 8": ("448 blocks", {"train.batch_size": 8}),
    "single: no warm-up (the former default)": ("448 blocks", {}),
    "single: warm-up 1 epoch (the default)": ("448 blocks", {"train.warmup_epochs": 1.0}),
    "single: flips mirrored maps, 0.5": (
        "448 blocks",
        {"train.hflip": 0.5, "train.hflip_from": "mirrored"},
    ),
    # issue 39's levers for the single head's box, each on the default (warm-up 1 epoch)
    "single: second level (blocks.4 packed beside the main map)": (
        "448 pyramid",
        {"train.warmup_epochs": 1.0},
    ),
    "single: trunk 256 wide, 3 convolutions": (
        "448 blocks",
        {"train.warmup_epochs": 1.0, "head.conv_width": 256, "head.conv_depth": 3},
    ),
}
FEATURES = {
    "default": {"image.size": 224, "backbone.layer": "head"},
    "fine": {
        "image.size": 224,
        "backbone.layer": "head",
        "backbone.fine_layer": "blocks.4",
        "grid.fine_below": 0.2,
    },
    "448": {"image.size": 448, "backbone.layer": "head"},
    "448 blocks": {"image.size": 448, "backbone.layer": "blocks"},
    "448 pyramid": {
        "image.size": 448,
        "backbone.layer": "blocks",
        "backbone.fine_layer": "blocks.4",
    },
    "448 hflip": {"image.size": 448, "backbone.layer": "blocks", "backbone.hflip": True},
    "224 pyramid": {
        "image.size": 224,
        "backbone.layer": "blocks",
        "backbone.fine_layer": "blocks.4",
    },
    "448 blocks lite1": {
        "image.size": 448,
        "backbone.layer": "blocks",
        "backbone.name": "efficientnet_lite1",
    },
}
FOCAL = LAB | {"train.obj_loss": "focal"}  # the model the first fine-tuning rows start from
# fine-tuning rows: name -> (feature setting, the frozen model's params (seed 0), finetune params)
FINETUNE = {
    "fine-tuning, 5 epochs": ("default", FOCAL, {"finetune.enabled": True}),
    "fine-tuning, 10 epochs": (
        "default",
        FOCAL,
        {"finetune.enabled": True, "finetune.epochs": 10},
    ),
    "head only, from images": (
        "default",
        FOCAL,
        {"finetune.enabled": True, "finetune.unfreeze": 0},
    ),
    # FCOS on two levels fine-tuned (issue 38: it runs and its mAP moves), at 224 to fit a CPU
    "224: fcos, two levels (10 epochs): fine-tuning, 3 epochs": (
        "224 pyramid",
        {"head.grid_kind": "fcos", "train.epochs": 10},
        {"finetune.enabled": True, "finetune.epochs": 3},
    ),
    # today's default head and features (params.yaml) fine-tuned: it runs and its mAP moves on CPU
    "default: fine-tuning, 2 epochs": (
        "448 blocks",
        {},
        {"finetune.enabled": True, "finetune.epochs": 2},
    ),
}


def voc_params(voc: Path | None, changes: dict, fold: tuple[int, int] | None = None) -> dict:
    """The protocol's params: the VOC2007 subset (None: the synthetic default; `fold` = (f, K):
    fold f of `fold_dataset`'s K, whose folder `voc` then is), the default params and the row's
    `changes`."""
    if voc is None:
        return changes
    split = fold_split(*fold) + "_" if fold else ""
    return {
        "data.source": "voc",
        "data.root": str(voc),
        "data.year": 2007,
        "data.train_split": f"{split}train",
        "data.val_split": f"{split}val",
        **changes,
    }


def fold_dataset(work: Path, voc: Path, folds: int) -> Path:
    """A VOCdevkit folder in `work` whose VOC2007 links the subset's Annotations and JPEGImages
    and holds ImageSets/Main/fold<f>of<K>_train.txt and _val.txt: the subset's train and val ids
    together, shuffled once (seed 0) and dealt into `folds` parts, part f the val of fold f."""
    year = work / "folds" / "VOCdevkit" / "VOC2007"
    main = year / "ImageSets" / "Main"
    main.mkdir(parents=True, exist_ok=True)
    for name in ("Annotations", "JPEGImages"):
        if not (year / name).exists():
            (year / name).symlink_to(voc / "VOC2007" / name, target_is_directory=True)
    listed = voc / "VOC2007" / "ImageSets" / "Main"
    ids = sorted(
        {i for split in ("train", "val") for i in (listed / f"{split}.txt").read_text().split()}
    )
    random.Random(0).shuffle(ids)
    for fold in range(folds):
        parts = {
            "val": ids[fold::folds],
            "train": [i for k, i in enumerate(ids) if k % folds != fold],
        }
        for split, part in parts.items():
            (main / f"{fold_split(fold, folds)}_{split}.txt").write_text(
                "\n".join(sorted(part)) + "\n"
            )
    return year.parent


def fold_split(fold: int, folds: int) -> str:
    return f"fold{fold}of{folds}"


def features_folder(
    work: Path, feature_setting: str, voc: Path | None, fold: tuple[int, int] | None = None
) -> Path:
    """The working folder of a feature setting (of `fold` = (f, K) of the photos), prepared and
    extracted on first use."""
    folder = work / (feature_setting + (f" {fold_split(*fold)}" if fold else ""))
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "data/features/val.safetensors").is_file():
        write_params(folder, voc_params(voc, FEATURES[feature_setting], fold))
        if voc is None:
            stage(folder, "synthesize")
        stage(folder, "prepare")
        stage(folder, "extract")
    return folder


def continuous_map(folder: Path) -> float:
    """mAP@eval.iou_threshold of the trained grid head with the continuous IoU (the former one),
    on the same detections as the evaluate stage."""
    from pipeline_lib.base.params import by_name, load_params
    from pipeline_lib.boxes.detection import Filtering
    from pipeline_lib.evaluation.evaluate import read_evaluation_inputs
    from pipeline_lib.measures.metrics import voc_summary
    from pipeline_lib.models.targets import ground_truth
    from pipeline_lib.training.loop import predict

    ev = load_params(folder / "params.yaml").eval
    inputs = read_evaluation_inputs(
        folder / "models/multi.safetensors",
        folder / "data/prepared",
        folder / "data/features/val.safetensors",
    )
    outputs = predict(inputs.checkpoint.head, inputs.features.features)
    keep = by_name(Filtering, ev)
    spec = inputs.checkpoint.card.image
    head = inputs.checkpoint.head
    found = head.detections(outputs, inputs.image_sizes(), spec, keep)
    truth = ground_truth(inputs.prepared.objects, inputs.features.image_ids)
    classes = inputs.prepared.classes
    return voc_summary(found, truth, classes, ev.iou_threshold, "continuous").map()


def main(
    voc: Path = REPO.parent / "shared/voc/VOCdevkit",
    work: Path = Path("/tmp/ablations"),
    seeds: list[int] = (0, 1),  # noqa: B008
    row: list[str] = (),  # noqa: B008
    finetune: bool = False,
    synthetic: bool = False,
    folds: int = 0,
    judge: str = "",
) -> None:
    """--synthetic: the same rows on the embedded synthetic default instead of VOC2007; --folds
    K: every row on K folds of the subset's photos (0: its own train / val split); --judge ROW:
    each row against ROW with the report's paired bootstrap, over its folds' pooled records."""
    voc = None if synthetic else voc.resolve()
    if voc is not None and not (voc / "VOC2007" / "Annotations").is_dir():
        raise SystemExit(f"no VOC2007 folder in {voc} (pass --voc)")
    if folds and voc is None:
        raise SystemExit("--folds deals the VOC2007 subset's photos: not with --synthetic")
    results_file = work / "results.jsonl"
    done = set()
    if results_file.is_file():
        done = {
            (r["row"], r["seed"], r.get("fold"))
            for r in map(json.loads, results_file.read_text().splitlines())
        }
    fold_list = [(f, folds) for f in range(folds)] if folds else [None]
    dataset = fold_dataset(work, voc, folds) if folds else voc
    for name, (feature_setting, changes) in ROWS.items():
        if row and name not in row:
            continue
        for fold in fold_list:
            label = fold and fold_split(*fold)
            folder = features_folder(work, feature_setting, dataset, fold)
            for seed in seeds:
                if (name, seed, label) in done:
                    continue
                params = FEATURES[feature_setting] | row_params(name, changes)
                params |= {"train.seed": seed}
                write_params(folder, voc_params(dataset, params, fold))
                result = run_row(folder, name, seed) | ({"fold": label} if fold else {})
                shutil.copytree(
                    folder / f"reports/evaluate_{head_task(name)}/records",
                    records_folder(work, name, seed, label),
                    dirs_exist_ok=True,
                )
                with results_file.open("a") as out:
                    out.write(json.dumps(result) + "\n")
    if finetune:
        run_finetune(work, voc, results_file, done, row)
    summarise(results_file)
    if judge:
        judge_rows(work, judge, [r for r in ROWS if r != judge and (not row or r in row)], folds)


def row_params(row: str, changes: dict) -> dict:
    """A row's params: "default" and the "default: ..." fine-tuning rows as params.yaml has them,
    every other row on CONV_ERA."""
    return changes if row.split(":")[0] == "default" else CONV_ERA | changes


def head_task(row: str) -> str:
    """The head a row trains and evaluates: rows named "single..." the single head's."""
    return "single" if row.startswith("single") else "multi"


def records_folder(work: Path, row: str, seed: int, fold: str | None) -> Path:
    """Where a run's per-image records are kept (the evaluate stage's, copied)."""
    return work / "records" / row.replace("/", "_") / (fold or "split") / f"seed{seed}"


def pooled_records(work: Path, row: str, seed: int, folds: int):
    """A run's records over every fold's val photos, pooled into one set of records (each photo
    once: the folds' val parts are disjoint), or None when a fold's records are missing."""
    from pipeline_lib.measures.records import read_records

    parts = [
        records_folder(work, row, seed, fold_split(f, folds) if folds else None)
        for f in range(max(folds, 1))
    ]
    if not all((p / "records.json").is_file() for p in parts):
        return None
    runs = [read_records(p) for p in parts]
    tables = {
        f.name: pd.concat([getattr(r, f.name) for r in runs], ignore_index=True)
        for f in fields(runs[0])
        if isinstance(getattr(runs[0], f.name), pd.DataFrame)
    }
    return replace(runs[0], **tables)


def judge_rows(work: Path, base: str, rows: list[str], folds: int) -> None:
    """Each of `rows` against `base`: the review's verdict (review.judge: the paired bootstrap
    over the pooled val photos and the seeds both have) on each headline figure."""
    from pipeline_lib.reporting.review import judge

    seeds = range(10)
    base_runs = {s: pooled_records(work, base, s, folds) for s in seeds}
    for name in rows:
        pairs = [
            (base_runs[s], new)
            for s in seeds
            if base_runs[s] is not None and (new := pooled_records(work, name, s, folds))
        ]
        if not pairs:
            continue
        if head_task(name) == "multi":
            for side in (base, name):
                gains = error_gains(work, side)
                split = ", ".join(f"{k} {v:.3f}" for k, v in gains.items() if k != "runs")
                print(f"{side}: TIDE's mAP gains, mean of {gains['runs']} runs: {split}")
        for j in judge([b for b, _ in pairs], [n for _, n in pairs], draws=1000, confidence=0.95):
            c = j.change
            print(
                f"{name} against {base} ({len(pairs)} seeds, {j.images} photos): {j.figure} "
                f"{c.old:.4f} -> {c.new:.4f} ({c.new - c.old:+.4f}, 95 % interval "
                f"{c.low:+.4f} .. {c.high:+.4f}): {c.verdict}"
            )


def error_gains(work: Path, row: str) -> dict[str, float] | None:
    """TIDE's split of each kept run of a grid row (each fold and seed on its own val photos,
    errortypes.split_errors as the evaluate stage and the review run it): each error type's mAP
    gain, the mean over the runs, and how many runs; None without records."""
    from pipeline_lib.measures.errortypes import ERROR_TYPES
    from pipeline_lib.measures.records import read_records
    from pipeline_lib.reporting.review import error_splits

    kept = sorted((work / "records" / row.replace("/", "_")).glob("*/seed*/records.json"))
    runs = [read_records(path.parent) for path in kept]
    if not runs:
        return None
    splits = [error_splits([run], run.images["image_id"].tolist())[0] for run in runs]
    gains = {kind: statistics.mean(split.gains[kind] for split in splits) for kind in ERROR_TYPES}
    return gains | {"runs": len(runs)}


def run_row(folder: Path, name: str, seed: int) -> dict:
    """Train and evaluate the row's head in `folder` (its params written): its metrics, and for
    the grid head the continuous-IoU mAP and mAP by object size."""
    kind = head_task(name)
    trained = stage(folder, "train", kind, "--no-progress").splitlines()[-1]
    stage(folder, "evaluate", kind)
    metrics = json.loads((folder / f"reports/evaluate_{kind}/metrics.json").read_text())
    result = {"row": name, "seed": seed, "trained": trained, **metrics}
    where = f"{name} seed {seed} ({folder.name})"
    if kind == "single":
        print(f"{where}: accuracy {metrics['accuracy']:.4f}, mean IoU {metrics['mean_iou']:.4f}")
        return result
    result["continuous_map"] = continuous_map(folder)
    sizes = folder / "reports/evaluate_multi/ap_by_size.json"
    if sizes.is_file():  # mAP@0.5 by object size (small, medium, large)
        result |= {f"map_{r['size']}": r["map"] for r in json.loads(sizes.read_text())}
    print(
        f"{where}: mAP@0.5 {metrics['map']:.4f} (devkit overlap), "
        f"{result['continuous_map']:.4f} (continuous)",
        flush=True,
    )
    return result


def run_finetune(
    work: Path, voc: Path, results_file: Path, done: set, rows: list[str] = ()
) -> None:
    """The fine-tuning rows (`rows`: those only), each from its seed-0 frozen model (retrained
    first: another may be there)."""
    for name, (feature_setting, frozen, changes) in FINETUNE.items():
        if rows and name not in rows:
            continue
        folder = features_folder(work, feature_setting, voc)
        for seed in (0, 1) if name == "fine-tuning, 5 epochs" else (0,):
            if (name, seed) in done:
                continue
            reference = FEATURES[feature_setting] | row_params(name, frozen) | {"train.seed": 0}
            write_params(folder, voc_params(voc, reference))
            stage(folder, "train", "multi", "--no-progress")
            tuned = reference | {"finetune.seed": seed} | changes
            write_params(folder, voc_params(voc, tuned))
            trained = stage(folder, "finetune", "train").splitlines()[-1]
            stage(folder, "finetune", "evaluate")
            metrics = json.loads((folder / "reports/evaluate_finetune/metrics.json").read_text())
            with results_file.open("a") as out:
                out.write(
                    json.dumps({"row": name, "seed": seed, "trained": trained, **metrics}) + "\n"
                )
            print(
                f"{name} seed {seed}: mAP@0.5 {metrics['map_frozen']:.4f} -> {metrics['map']:.4f}",
                flush=True,
            )


def summarise(results_file: Path) -> None:
    """Per row (and per protocol: the subset's split, or its folds): the mean of each figure over
    the runs, with the runs' values; over folds also their standard deviation."""
    rows: dict[str, list[dict]] = {}
    for line in results_file.read_text().split("\n"):
        if line:
            result = json.loads(line)
            folds = result.get("fold", "").split("of")[-1]
            name = result["row"] + (f" [{folds} folds]" if folds else "")
            rows.setdefault(name, []).append(result)
    keys = (
        "accuracy",
        "mean_iou",
        "map",
        "continuous_map",
        "map_11point",
        "coco_map",
        "map_iou_0.1",
        "map_small",
        "map_medium",
        "map_large",
        "recall_upper_bound",
        "detections_per_image",
        "map_frozen",
        "gain",
    )
    for name, runs in rows.items():
        runs.sort(key=lambda r: (r.get("fold", ""), r["seed"]))
        parts = []
        for key in keys:
            values = [r[key] for r in runs if key in r]
            if values:
                spread = ", ".join(f"{v:.4f}" for v in values)
                sd = f" sd {statistics.stdev(values):.4f}" if len(values) > 2 else ""
                parts.append(f"{key} {statistics.mean(values):.4f}{sd} ({spread})")
        where = ", ".join(
            " ".join(filter(None, (r.get("fold"), f"seed {r['seed']}"))) for r in runs
        )
        print(f"{name} [{where}]: " + "; ".join(parts))


if __name__ == "__main__":
    typer.run(main)
