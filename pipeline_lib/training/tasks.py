"""Training tasks: what the train stage fits for each head kind, built from the prepared tables and
the cached features.

A `Task` bundles a fresh head, its train/val `Dataset`s (features and aligned targets), the
objective (loss and training measures), the curves worth logging, and the model card the trained
head will be saved with. `single_task` and `grid_task` build one from the params; `loop.fit`
trains it; `finish_card` adds the training summary to its card.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import nn

from pipeline_lib.base.errors import PipelineError
from pipeline_lib.base.params import FinetuneParams, Params, TrainParams, by_name
from pipeline_lib.boxes.anchors import kmeans_anchors
from pipeline_lib.boxes.geometry import ImageSpec
from pipeline_lib.data.tables import Prepared, read_prepared
from pipeline_lib.features.backbones import mirror_features
from pipeline_lib.features.featurefiles import FeatureRows, Features, read_features
from pipeline_lib.models.headkinds import build_head, kind_named
from pipeline_lib.models.losses import LossWeights, Objective
from pipeline_lib.models.modelcard import GridSpec, ModelCard
from pipeline_lib.models.targets import (
    image_objects,
    inclusive_pixels,
    single_object_targets,
    training_shapes,
)
from pipeline_lib.training.loop import Dataset, FitResult, Flips, TrainConfig

SPLITS = ("train", "val")
FLIPPED_FILE = "train_flipped.safetensors"  # the training images flipped (backbone.hflip)
SINGLE_CURVES = ("loss", "box_loss", "class_loss", "accuracy", "iou")
GRID_CURVES = ("loss", "box_loss", "class_loss", "obj_loss", "accuracy", "iou", "obj_accuracy")
HEADLINE_MEASURES = ("loss", "accuracy", "iou", "obj_accuracy")  # of the curves, in metrics.json


@dataclass
class TrainingInputs:
    """The prepared tables and the train/val features, with the image spec they were made with."""

    prepared: Prepared
    features: dict[str, Features]

    @property
    def spec(self) -> ImageSpec:
        metadata = self.features["train"].metadata
        return ImageSpec(metadata["image_mode"], int(metadata["image_size"]))

    def ids(self, split: str) -> list[str]:
        return self.features[split].image_ids


def read_training_inputs(
    prepared_dir: Path, features_dir: Path, lazy: bool = False
) -> TrainingInputs:
    """data/prepared and data/features/{train,val}.safetensors (with `lazy`, the features stay
    on disk and are read batch by batch: `featurefiles.FeatureRows`)."""
    prepared = read_prepared(prepared_dir)
    paths = {split: features_dir / f"{split}.safetensors" for split in SPLITS}
    if (features_dir / FLIPPED_FILE).is_file():  # backbone.hflip
        paths["train_flipped"] = features_dir / FLIPPED_FILE
    features = {split: read_features(path, lazy) for split, path in paths.items()}
    return TrainingInputs(prepared, features)


@dataclass
class Task:
    head: nn.Module
    data: dict[str, Dataset]  # "train", "val"
    objective: Objective
    curves: tuple[str, ...]  # training measures worth a curve
    card: ModelCard  # its `train` summary is filled by `finish_card`
    notes: list[str] = field(default_factory=list)  # for the user to read
    warnings: list[str] = field(default_factory=list)
    summary: dict = field(default_factory=dict)  # extra entries of the training metrics


def loss_weights(train: TrainParams) -> LossWeights:
    """How the loss parts add up, from params train.* (by name)."""
    return by_name(LossWeights, train)


def single_task(inputs: TrainingInputs, params: Params) -> Task:
    """The single-object head: class and box of each image's largest object."""
    data, warnings = {}, []
    tables, spec = inputs.prepared, inputs.spec
    for split in SPLITS:
        ids = inputs.ids(split)
        t = single_object_targets(tables.images, tables.objects, ids, spec)
        if not t.present.any():
            raise PipelineError(
                f"{split}: none of {len(ids)} images has an object left after image.mode "
                f"{spec.mode} (size {spec.size}); nothing to train or validate on"
            )
        if not t.present.all():
            left_out = int((~t.present).sum())
            warnings.append(
                f"{split}: {left_out} images have no object after image.mode {spec.mode}; left out"
            )
        keep = t.present
        data[split] = Dataset(_rows(inputs.features[split], keep), (t.boxes[keep], t.labels[keep]))
    if params.train.hflip:
        ids, inclusive = inputs.ids("train"), inclusive_pixels(tables)
        t = single_object_targets(tables.images, tables.objects, ids, spec, True, inclusive)
        keep = t.present
        flips = training_flips(inputs, params, (t.boxes[keep], t.labels[keep]), keep)
        data["train"].flips = flips
    entry = kind_named("single", params.head.single_kind).entry(params.head)
    card = _card(inputs, "single", entry)
    head = _build_head(card)
    objective = head.objective(loss_weights(params.train))
    return Task(head, data, objective, SINGLE_CURVES, card, warnings=warnings)


def _rows(features: Features, keep: torch.Tensor | None = None) -> torch.Tensor | FeatureRows:
    """A feature file's rows, those where `keep` is true (all: None)."""
    rows = features.features
    if keep is None:
        return rows
    return rows.select(keep) if isinstance(rows, FeatureRows) else rows[keep]


def training_flips(
    inputs: TrainingInputs, params: Params, targets: tuple, keep: torch.Tensor | None = None
) -> Flips:
    """train.hflip: the flipped training images (rows where `keep` is true), with their
    `targets`: their extracted features (train.hflip_from: extracted) or the cached maps
    mirrored."""
    train = params.train
    generator = torch.Generator().manual_seed(train.seed + 1)  # draws apart from the order's
    if train.hflip_from == "mirrored":
        fine = int(inputs.features["train"].metadata["backbone"].get("fine_channels", 0))
        return Flips(
            train.hflip, targets, generator, mirror=partial(mirror_features, fine_channels=fine)
        )
    flipped = inputs.features.get("train_flipped")
    if flipped is None:
        raise PipelineError(
            "train.hflip with train.hflip_from: extracted needs the flipped training images' "
            f"features (data/features/{FLIPPED_FILE}): set backbone.hflip: true, or "
            "train.hflip_from: mirrored"
        )
    if flipped.image_ids != inputs.ids("train"):
        raise PipelineError(
            f"data/features/{FLIPPED_FILE} does not hold the images of train.safetensors in "
            "their order: run dvc repro extract"
        )
    return Flips(train.hflip, targets, generator, features=_rows(flipped, keep))


def grid_task(inputs: TrainingInputs, params: Params) -> Task:
    """The multi-object head of kind head.grid_kind (headkinds.py), on the cached level(s), with
    the grid, anchors and second level params grid.*, backbone.fine_layer ask for where the kind
    takes them; its targets, objective and card."""
    kind = kind_named("multi", params.head.grid_kind)
    fine_channels = int(inputs.features["train"].metadata["backbone"].get("fine_channels", 0))
    notes: list[str] = []
    anchors = fit_anchors(params.grid.anchors, inputs, notes)
    anchor_list = None if anchors is None else anchors.tolist()
    card = _card(inputs, "multi", kind.entry(params.head))
    card.grid = kind.layout(params.grid, fine_channels, card.feature_shape, anchor_list)
    head = _build_head(card)
    data, collisions = {}, {}
    for split in SPLITS:
        objects = image_objects(inputs.prepared, inputs.ids(split), inputs.spec)
        data[split] = Dataset(inputs.features[split].features, kind.targets(card, objects))
        total = sum(len(labels) for _, labels in objects)
        learnable = head.learnable_objects(card, inputs.prepared, inputs.ids(split))
        collisions[split] = {"objects": total, "dropped": total - learnable}
        notes.append(
            f"{split}: {total - learnable} of {total} objects get no place in the head's "
            "assignment (a cell or anchor slot taken by a later object, or no location) and are "
            f"not learned ({_cells(card.grid)} cells)"
        )
    if params.train.hflip:
        mirrored = image_objects(inputs.prepared, inputs.ids("train"), inputs.spec, mirrored=True)
        data["train"].flips = training_flips(inputs, params, kind.targets(card, mirrored))
    card.collisions = collisions
    # objects per split that lost their cell (the model card keeps the totals too)
    summary: dict = {"grid_collisions": {split: c["dropped"] for split, c in collisions.items()}}
    if anchor_list is not None:
        summary["anchors"] = [[round(v, 4) for v in a] for a in anchor_list]
    objective = head.objective(loss_weights(params.train))
    return Task(head, data, objective, GRID_CURVES, card, notes=notes, summary=summary)


def _cells(grid: GridSpec) -> str:
    """The grid's levels as a note says them: "14x14", "14x14 and 28x28"."""
    sides = [grid.num_cells] + [2 * grid.num_cells] * bool(grid.fine_channels)
    return " and ".join(f"{s}x{s}" for s in sides)


def fit_anchors(k: int, inputs: TrainingInputs, notes: list[str]) -> torch.Tensor | None:
    """grid.anchors = k > 0: (k, 2) float32 anchor shapes from k-means on the training boxes
    (None for k = 0)."""
    if k == 0:
        return None
    tables = inputs.prepared
    shapes = training_shapes(tables.images, tables.objects, inputs.ids("train"), inputs.spec)
    if len(shapes) < k:
        raise PipelineError(
            f"grid.anchors: {k} anchors need at least {k} training boxes, found {len(shapes)}"
        )
    anchors, fitness = kmeans_anchors(shapes, k)
    text = ", ".join(f"{w:.3f}x{h:.3f}" for w, h in anchors.tolist())
    notes.append(
        f"anchors (w x h, image fractions) from k-means on {len(shapes)} training boxes: "
        f"{text}; mean IoU of a box with its best anchor {fitness:.3f}"
    )
    return anchors.float()


def train_config(group: TrainParams | FinetuneParams, device: str) -> TrainConfig:
    """The training loop's settings from params train.* or finetune.* (by name; fine-tuning has
    no ema_decay or warmup_epochs: off), on `device`, already resolved."""
    return by_name(TrainConfig, group, device=device)


def training_metrics(task: Task, result: FitResult, config: TrainConfig) -> dict:
    """The headline figures of a training run (its DVC metrics file): the best epoch with its val
    loss, accuracy, IoU (and objectness accuracy) and train loss, seconds per epoch, the CPU
    kernels that ran (train.cpu_kernels) and the task's extras (grid collisions). Every measure
    of every epoch is in the curves (dvclive's plots/); image counts in prepare's metrics."""
    best = result.history[result.best_epoch - 1]
    metrics = {
        "best_epoch": result.best_epoch,
        "val": {k: round(v, 6) for k, v in best["val"].items() if k in HEADLINE_MEASURES},
        "train_loss": round(best["train"]["loss"], 6),
        "seconds_per_epoch": round(result.seconds / config.epochs, 2),
    }
    if config.device == "cpu":
        metrics["cpu_kernels"] = torch.backends.cpu.get_cpu_capability()
    return metrics | task.summary


def finish_card(task: Task, result: FitResult, train: TrainParams) -> ModelCard:
    """The task's card with the training summary of `result`."""
    task.card.train = {
        "best_epoch": result.best_epoch,
        "monitor": train.monitor,
        "best_monitor": result.best_monitor,
        "epochs": train.epochs,
    }
    return task.card


def _card(inputs: TrainingInputs, kind: str, head: dict) -> ModelCard:
    features = inputs.features["train"]
    return ModelCard(
        kind=kind,
        head=head,
        classes=inputs.prepared.classes,
        feature_shape=list(features.features.shape[1:]),
        feature_dtype=str(features.features.dtype).removeprefix("torch."),
        backbone=features.metadata["backbone"],
        image=inputs.spec,
    )


def _build_head(card: ModelCard) -> nn.Module:
    try:
        return build_head(card)
    except ValueError as error:  # e.g. more grid cells than the feature map has
        raise PipelineError(str(error)) from None
