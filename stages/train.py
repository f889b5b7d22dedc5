"""Stages train_single and train_multi: train a detection head on the cached features.

    python -m stages.train single [--params params.yaml]
    python -m stages.train multi  [--params params.yaml]

Writes, for KIND = single | multi,
- models/KIND.safetensors: the head of the best epoch (train.monitor on val) with everything
  needed to use it: backbone, layer, normalisation, image mode and size, classes, head params
  (see pipeline_lib/heads.py),
- reports/train_KIND/: dvclive's logs -- metrics.json (last epoch, plus the best epoch under
  "best") and plots/metrics/{train,val}/*.tsv (one row per epoch) -- and training_curves.png.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import typer
from dvclive import Live
from scmrepo.exceptions import SCMError

from pipeline_lib.anchors import kmeans_anchors
from pipeline_lib.errors import PipelineError
from pipeline_lib.features import Features, pick_device, read_features
from pipeline_lib.heads import MultiObjectHead, SingleObjectHead, TwoLevelHead, save_checkpoint
from pipeline_lib.losses import multi_object_loss, single_object_loss, two_level_loss
from pipeline_lib.metrics import multi_object_batch_sums, single_object_batch_sums
from pipeline_lib.params import Params, load_params
from pipeline_lib.plots import save_figure, training_curves
from pipeline_lib.tables import Prepared, read_prepared
from pipeline_lib.targets import (
    grid_levels,
    multi_object_targets,
    single_object_targets,
    training_shapes,
)
from pipeline_lib.training import Dataset, TrainConfig, fit, pin_cpu_kernels, seed_everything
from stages.common import (
    FEATURES_DIR,
    MODELS_DIR,
    PARAMS_OPTION,
    PREPARED_DIR,
    REPORTS_DIR,
    clean_errors,
)

app = typer.Typer(add_completion=False, help="Train a head on the cached features.")

SPLITS = ("train", "val")


@app.callback()
def main() -> None:
    """One command per head kind."""


@app.command()
def single(params_file: Path = PARAMS_OPTION, progress: bool = True) -> None:
    """Single-object head: class and box of each image's largest object."""
    with clean_errors():
        params = begin(params_file)
        prepared, features, mode, size = load_inputs()
        data = {}
        for split in SPLITS:
            ids, tensor = features[split].image_ids, features[split].features
            t = single_object_targets(prepared.images, prepared.objects, ids, mode, size)
            if not t.present.any():
                raise PipelineError(
                    f"{split}: none of {len(ids)} images has an object left after image.mode "
                    f"{mode} (size {size}); nothing to train or validate on"
                )
            if not t.present.all():
                left_out = int((~t.present).sum())
                typer.secho(f"warning: {split}: {left_out} images have no object after "
                            f"image.mode {mode}; left out", err=True, fg="yellow")  # fmt: skip
            keep = t.present
            data[split] = Dataset(tensor[keep], (t.boxes[keep], t.labels[keep]))
        head_params, train = params.head, params.train
        config = {
            "hidden": head_params.hidden,
            "dropout": head_params.dropout,
            "classifier": head_params.classifier,
            "classifier_dropout": head_params.classifier_dropout,
        }
        shape = tuple(data["train"].features.shape[1:])
        head = SingleObjectHead(shape, len(prepared.classes), **config)

        def loss_fn(outputs, targets):
            return single_object_loss(*outputs, *targets, train.box_weight, train.class_weight)

        info = {"kind": "single", "head": config}
        curves = ("loss", "box_loss", "class_loss", "accuracy", "iou")
        run_training(params, head, data, loss_fn, single_object_batch_sums, curves, info,
                     prepared, features, progress)  # fmt: skip


@app.command()
def multi(params_file: Path = PARAMS_OPTION, progress: bool = True) -> None:
    """Multi-object grid head: box, class and objectness per cell."""
    with clean_errors():
        params = begin(params_file)
        prepared, features, mode, size = load_inputs()
        grid = params.grid
        cells = grid.num_cells
        fine_channels = int(features["train"].metadata["backbone"].get("fine_channels", 0))
        if fine_channels and grid.anchors:
            raise PipelineError("grid.anchors with a second feature level (backbone.fine_layer) "
                                "is not supported yet: set grid.anchors: 0 or backbone.fine_layer: "
                                "none")  # fmt: skip
        levels = grid_levels(cells, grid.fine_below if fine_channels else None)
        anchors = fit_anchors(grid.anchors, prepared, features["train"].image_ids, mode, size)
        data, collisions = {}, {}
        for split in SPLITS:
            ids, tensor = features[split].image_ids, features[split].features
            targets, objects, dropped = [], 0, 0
            for n, scales in levels:
                t = multi_object_targets(prepared.images, prepared.objects, ids, mode, size, n,
                                         anchors, scales)  # fmt: skip
                targets += [t.boxes, t.has_obj, t.labels]
                objects, dropped = objects + int(t.objects.sum()), dropped + int(t.dropped.sum())
            data[split] = Dataset(tensor, tuple(targets))
            collisions[split] = {"objects": objects, "dropped": dropped}
            slot = " and anchor" if anchors is not None else ""
            grids = " and ".join(f"{n}x{n}" for n, _ in levels)
            typer.echo(f"{split}: {dropped} of {objects} objects share a grid cell{slot} with a "
                       f"later one and are not learned ({grids} cells)")  # fmt: skip
        head_params, train = params.head, params.train
        config = {"hidden": head_params.grid_hidden, "dropout": head_params.dropout}
        shape = tuple(data["train"].features.shape[1:])
        anchor_list = None if anchors is None else anchors.tolist()
        try:
            if fine_channels:
                head = TwoLevelHead(shape, len(prepared.classes), fine_channels, cells, **config)
            else:
                head = MultiObjectHead(shape, len(prepared.classes), num_cells=cells,
                                       anchors=anchor_list, **config)  # fmt: skip
        except ValueError as error:
            raise PipelineError(str(error)) from None
        weights = {"box_weight": train.box_weight, "class_weight": train.class_weight,
                   "obj_weight": train.obj_weight, "obj_loss": train.obj_loss,
                   "focal_gamma": train.focal_gamma, "focal_alpha": train.focal_alpha}  # fmt: skip

        def loss_fn(outputs, targets):
            if fine_channels:
                return two_level_loss(outputs, targets, **weights)
            return multi_object_loss(*outputs, *targets, **weights)

        info = {"kind": "multi", "head": config, "num_cells": cells, "collisions": collisions}
        if anchors is not None:
            info["anchors"] = anchor_list
        if fine_channels:
            info |= {"fine_channels": fine_channels, "fine_below": grid.fine_below}
        curves = ("loss", "box_loss", "class_loss", "obj_loss", "accuracy", "iou", "obj_accuracy")
        run_training(params, head, data, loss_fn, multi_object_batch_sums, curves, info,
                     prepared, features, progress)  # fmt: skip


def begin(params_file: Path) -> Params:
    """Read the params, choose the CPU kernels (before torch computes anything) and seed."""
    params = load_params(params_file)
    warning = pin_cpu_kernels(params.train.cpu_kernels)
    if warning:
        typer.secho(f"warning: train.{warning}", err=True, fg="yellow")
    seed_everything(params.train.seed)
    return params


def fit_anchors(
    k: int, prepared: Prepared, train_ids: list[str], mode: str, size: int
) -> torch.Tensor | None:
    """grid.anchors = k > 0: k anchor shapes fitted to the training boxes (None for k = 0)."""
    if k == 0:
        return None
    shapes = training_shapes(prepared.images, prepared.objects, train_ids, mode, size)
    if len(shapes) < k:
        raise PipelineError(f"grid.anchors: {k} anchors need at least {k} training boxes, "
                            f"found {len(shapes)}")  # fmt: skip
    anchors, fitness = kmeans_anchors(shapes, k)
    text = ", ".join(f"{w:.3f}x{h:.3f}" for w, h in anchors.tolist())
    typer.echo(f"anchors (w x h, image fractions) from k-means on {len(shapes)} training boxes: "
               f"{text}; mean IoU of a box with its best anchor {fitness:.3f}")  # fmt: skip
    return anchors.float()


def load_inputs() -> tuple[Prepared, dict[str, Features], str, int]:
    """The prepared tables, the train/val features, and the image mode and size they used."""
    prepared = read_prepared(PREPARED_DIR)
    features = {split: read_features(FEATURES_DIR / f"{split}.safetensors") for split in SPLITS}
    metadata = features["train"].metadata
    return prepared, features, metadata["image_mode"], int(metadata["image_size"])


def open_live(reports: Path) -> Live:
    """dvclive's logger for `reports` (it reads the git repository, which needs one commit)."""
    try:
        return Live(dir=str(reports), save_dvc_exp=False, dvcyaml=None)
    except SCMError as error:
        raise PipelineError(
            f"dvclive cannot read this git repository ({error}): commit once (git commit) "
            "before running the training stages"
        ) from None


def run_training(
    params: Params,
    head: torch.nn.Module,
    data: dict[str, Dataset],
    loss_fn: Callable,
    measure_fn: Callable,
    curves: tuple[str, ...],
    info: dict,
    prepared: Prepared,
    features: dict[str, Features],
    progress: bool,
) -> None:
    """Fit `head` with dvclive logging, then save the best epoch's checkpoint and curves."""
    kind, train = info["kind"], params.train
    config = TrainConfig(train.epochs, train.batch_size, train.lr, train.weight_decay,
                         train.lr_schedule, train.seed, train.monitor,
                         str(pick_device(train.device)))  # fmt: skip
    reports = REPORTS_DIR / f"train_{kind}"
    with open_live(reports) as live:

        def on_epoch(epoch: int, stats: dict) -> None:
            for split in SPLITS:
                for name in curves:
                    live.log_metric(f"{split}/{name}", round(stats[split][name], 6))
            live.log_metric("lr", stats["lr"])
            live.next_step()
            tr, va = stats["train"], stats["val"]
            typer.echo(
                f"epoch {epoch:3d}/{train.epochs}: train loss {tr['loss']:.4f} "
                f"acc {tr['accuracy']:.3f} iou {tr['iou']:.3f} | val loss {va['loss']:.4f} "
                f"box {va['box_loss']:.4f} acc {va['accuracy']:.3f} iou {va['iou']:.3f}"
            )

        result = fit(head, data["train"], data["val"], loss_fn, measure_fn, config, on_epoch,
                     progress)  # fmt: skip
        best = result.history[result.best_epoch - 1]
        live.summary["best"] = {
            "epoch": result.best_epoch,
            "monitor": round(result.best_monitor, 6),
            **{f"val_{k}": round(v, 6) for k, v in best["val"].items()},
        }
        live.summary["seconds_per_epoch"] = round(result.seconds / train.epochs, 2)
        live.summary["images"] = {split: len(data[split]) for split in SPLITS}
        if config.device == "cpu":  # train.cpu_kernels: what this machine ran
            live.summary["cpu_kernels"] = torch.backends.cpu.get_cpu_capability()
        if "collisions" in info:  # grid head: objects lost to shared cells bound the recall
            live.summary["grid_collisions"] = info["collisions"]
        if "anchors" in info:
            live.summary["anchors"] = [[round(v, 4) for v in a] for a in info["anchors"]]
    head.load_state_dict(result.best_state)
    metadata = features["train"].metadata
    info = {
        **info,
        "classes": prepared.classes,
        "feature_shape": list(data["train"].features.shape[1:]),
        "feature_dtype": str(features["train"].features.dtype).removeprefix("torch."),
        "backbone": metadata["backbone"],
        "image_mode": metadata["image_mode"],
        "image_size": int(metadata["image_size"]),
        "train": {
            "best_epoch": result.best_epoch,
            "monitor": train.monitor,
            "best_monitor": result.best_monitor,
            "epochs": train.epochs,
        },  # fmt: skip
    }
    path = MODELS_DIR / f"{kind}.safetensors"
    save_checkpoint(path, head, info)
    save_figure(training_curves(result.history, result.best_epoch, f"{kind}-object head"),
                reports / "training_curves.png")  # fmt: skip
    typer.echo(
        f"best epoch {result.best_epoch} ({train.monitor} {result.best_monitor:.4f}); "
        f"{result.seconds / train.epochs:.2f} s/epoch -> {path}"
    )


if __name__ == "__main__":
    app()
