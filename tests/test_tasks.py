"""Training tasks (tasks.py): what each head kind trains on, built from the real stages' tables and
features of the tiny set (the `trained` fixture)."""

from __future__ import annotations

import yaml
from conftest import lab_heads

from pipeline_lib.base.params import parse_params
from pipeline_lib.models.heads import (
    ConvGridHead,
    MlpGridHead,
    MlpSingleHead,
    SpatialSingleHead,
)
from pipeline_lib.training.loop import TrainConfig, fit
from pipeline_lib.training.tasks import grid_task, read_training_inputs, single_task


def inputs_and_params(trained, lab: bool = False, **groups: dict):
    """The tiny set's inputs and params (with the lab's heads if `lab`), groups updated."""
    raw = yaml.safe_load((trained / "params.yaml").read_text())
    if lab:
        lab_heads(raw)
    for group, changes in groups.items():
        raw[group].update(changes)
    inputs = read_training_inputs(trained / "data/prepared", trained / "data/features")
    return inputs, parse_params(raw)


def test_single_task_targets_head_and_card(trained):
    inputs, params = inputs_and_params(trained, lab=True)
    assert isinstance(single_task(inputs, params).head, MlpSingleHead)
    head = {"conv_width": 8, "conv_depth": 1, "dropout": 0.2}
    task = single_task(*inputs_and_params(trained, head=head))
    assert isinstance(task.head, SpatialSingleHead) and task.head.trunk[-1].p == 0.2
    assert task.card.head == {"kind": "spatial", "width": 8, "depth": 1, "dropout": 0.2}
    assert [len(task.data[s]) for s in ("train", "val")] == [12, 5]  # every image has an object
    boxes, labels = task.data["train"].targets
    assert boxes.shape == (12, 4) and ((boxes >= 0) & (boxes <= 1)).all()
    card = task.card
    assert card.kind == "single" and card.classes == inputs.prepared.classes
    assert card.feature_shape == list(inputs.features["train"].features.shape[1:])
    assert card.image == inputs.spec and card.grid is None


def test_grid_task_of_each_kind_and_what_it_refuses(trained):
    inputs, params = inputs_and_params(trained, lab=True)
    lab = grid_task(inputs, params)
    assert isinstance(lab.head, MlpGridHead) and lab.card.head == {
        "kind": "lab",
        "hidden": 16,
        "dropout": 0.5,
    }
    assert lab.card.collisions["train"]["objects"] >= 12 and len(lab.notes) == 2  # one per split
    dropped = {split: c["dropped"] for split, c in lab.card.collisions.items()}
    assert lab.summary["grid_collisions"] == dropped
    inputs, params = inputs_and_params(
        trained, lab=True, head={"grid_kind": "conv", "conv_width": 8, "conv_depth": 2}
    )
    conv = grid_task(inputs, params)
    assert isinstance(conv.head, ConvGridHead)
    assert conv.card.head == {"kind": "conv", "width": 8, "depth": 2, "dropout": 0.5}
    # same targets whatever the head
    for mine, theirs in zip(conv.data["train"].targets, lab.data["train"].targets, strict=True):
        assert mine.equal(theirs)
    # the conv head's default, neighbour cells: up to three cells per object
    inputs, params = inputs_and_params(trained, head={"grid_kind": "conv"}, grid={"num_cells": 7})
    dense = grid_task(inputs, params)
    has_obj = dense.data["train"].targets[1]
    assert has_obj.sum() > lab.data["train"].targets[1].sum()
    assert has_obj.sum() <= 3 * lab.card.collisions["train"]["objects"]
    config = TrainConfig(epochs=2, batch_size=4, lr=1e-3, weight_decay=0.0, monitor="loss")
    result = fit(
        conv.head, conv.data["train"], conv.data["val"], conv.objective, config, progress=False
    )
    assert len(result.history) == 2 and set(result.history[0]["val"]) >= {"obj_loss", "iou"}
    # anchors: the conv head takes every anchor within grid.anchor_ratio, the lab's the best one
    anchored = {"anchors": 2, "num_cells": 7, "anchor_ratio": 4.0}
    conv_anchors = grid_task(*inputs_and_params(trained, head={"grid_kind": "conv"}, grid=anchored))
    lab_anchors = grid_task(*inputs_and_params(trained, lab=True, grid=anchored))
    assert isinstance(conv_anchors.head, ConvGridHead) and conv_anchors.head.n_anchors == 2
    assert conv_anchors.card.grid.anchor_ratio == 4.0 and lab_anchors.card.grid.anchor_ratio is None
    assert (
        conv_anchors.card.grid.assign == "neighbours" and lab_anchors.card.grid.assign == "centre"
    )
    slots = [t.data["train"].targets[1].sum() for t in (conv_anchors, lab_anchors)]
    assert slots[0] > slots[1]  # more slots per object (neighbour cells, several anchors)
