"""Model files (checkpoints.py): every head rebuilt exactly from its file, bad files refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from pipeline_lib.models.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from pipeline_lib.models.fcos import FcosHead
from pipeline_lib.models.headkinds import build_head
from pipeline_lib.models.heads import (
    ConvGridHead,
    MlpGridHead,
    MlpSingleHead,
    PyramidGridHead,
    SpatialSingleHead,
    TwoLevelMlpHead,
)
from pipeline_lib.models.modelcard import ModelCard

CLASSES = ["cat", "dog", "bird"]
# What every card holds besides the head (see modelcard.py).
COMMON = {
    "feature_dtype": "float16",
    "backbone": {"name": "resnet18", "layer": "layer4", "weights": "imagenet"},
    "image_mode": "shrink",
    "image_size": 96,
    "train": {"best_epoch": 1},
}


def description(kind: str, head: dict, feature_shape: list[int], **grid) -> dict:
    """A stored card: `kind` ("single" or "multi"), the head's settings, and for grid heads
    num_cells and whichever of anchors, fine_channels and fine_below apply."""
    return {
        "kind": kind,
        "head": head,
        "feature_shape": feature_shape,
        "classes": CLASSES,
        **COMMON,
        **grid,
    }


def heads():
    """(head, its checkpoint description) for every kind of head, with non-default settings."""
    single = {"hidden": 8, "dropout": 0.3, "classifier": "flatten", "classifier_dropout": 0.2}
    grid = {"hidden": 6, "dropout": 0.1}
    anchors = [[0.1, 0.2], [0.5, 0.4]]
    conv = {"kind": "conv", "width": 5, "depth": 2}
    spatial = {"kind": "spatial", "width": 5, "depth": 1, "dropout": 0.1}
    fcos = {"kind": "fcos", "width": 32, "depth": 1}  # GroupNorm: 32 groups
    levels = {"num_cells": 3, "fine_channels": 2, "fine_below": 0.2}
    return {
        "single": (
            MlpSingleHead((4, 3, 3), 3, **single),
            description("single", single, [4, 3, 3]),
        ),
        "spatial": (
            SpatialSingleHead((4, 3, 3), 3, width=5, depth=1, dropout=0.1),
            description("single", spatial, [4, 3, 3]),
        ),
        "multi": (
            MlpGridHead((4, 6, 6), 3, num_cells=3, **grid),
            description("multi", grid, [4, 6, 6], num_cells=3),
        ),
        "anchors": (
            MlpGridHead((4, 3, 3), 3, num_cells=3, anchors=anchors, **grid),
            description("multi", grid, [4, 3, 3], num_cells=3, anchors=anchors),
        ),
        "two levels": (
            TwoLevelMlpHead((4 + 4 * 2, 3, 5), 3, 2, num_cells=2, **grid),
            description("multi", grid, [12, 3, 5], **levels | {"num_cells": 2}),
        ),
        "conv": (
            ConvGridHead((4, 6, 6), 3, num_cells=3, width=5, depth=2),
            description("multi", conv, [4, 6, 6], num_cells=3),
        ),
        "conv anchors": (
            ConvGridHead((4, 6, 6), 3, num_cells=3, width=5, depth=1, anchors=anchors),
            description("multi", conv | {"depth": 1}, [4, 6, 6], num_cells=3, anchors=anchors),
        ),
        "pyramid": (
            PyramidGridHead((4 + 4 * 2, 3, 3), 3, 2, num_cells=3, width=5, depth=1),
            description("multi", conv | {"depth": 1}, [12, 3, 3], **levels),
        ),
        "fcos": (
            FcosHead((4 + 4 * 2, 3, 3), 3, 96, 2, width=32, depth=1),
            description("multi", fcos, [12, 3, 3], **levels),
        ),
    }


# heads() builds modules: not at import (mutmut forks its test processes from the importer)
KINDS = [
    "single",
    "spatial",
    "multi",
    "anchors",
    "two levels",
    "conv",
    "conv anchors",
    "pyramid",
    "fcos",
]


@pytest.mark.parametrize("kind", KINDS)
def test_every_head_is_rebuilt_exactly_from_its_file(tmp_path, kind):
    torch.manual_seed(0)
    head, info = heads()[kind]
    for module in head.modules():  # BatchNorm statistics are saved too: make them not trivial
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, head, ModelCard.from_dict(info))
    loaded = load_checkpoint(path)
    assert (
        loaded.card.to_dict() == info
        and loaded.classes == CLASSES
        and loaded.backbone_state is None
    )
    assert not loaded.head.training
    assert repr(loaded.head) == repr(head)  # same layers, sizes, dropout rates, pooling
    assert repr(build_head(ModelCard.from_dict(info))) == repr(head)
    expected = {k: v for k, v in head.state_dict().items()}
    assert loaded.head.state_dict().keys() == expected.keys()
    for name, tensor in loaded.head.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    features = torch.randn(2, *info["feature_shape"])
    head.eval()
    for mine, theirs in zip(head(features), loaded.head(features), strict=True):
        assert torch.equal(mine, theirs)


def test_a_file_whose_tensors_do_not_match_its_description_is_refused(tmp_path):
    head, info = heads()["multi"]
    tensors = {k: v.contiguous() for k, v in head.state_dict().items()}
    path = tmp_path / "model.safetensors"
    for _, change in (
        ("extra tensor", lambda t: t | {"surplus": torch.zeros(1)}),
        ("missing tensor", lambda t: {k: v for k, v in t.items() if "classification" not in k}),
        ("wrong shape", lambda t: t | {"classification.1.bias": torch.zeros(7)}),
    ):
        save_file(change(tensors), str(path), metadata={"pipeline": json.dumps(info)})
        with pytest.raises(CheckpointError, match="does not fit its tensors"):
            load_checkpoint(path)
    save_file(tensors, str(path), metadata={"pipeline": json.dumps(info | {"kind": "double"})})
    with pytest.raises(CheckpointError, match="unknown head kind 'double'"):
        load_checkpoint(path)
    save_file(tensors, str(path), metadata={"pipeline": json.dumps({"kind": "multi"})})
    with pytest.raises(CheckpointError, match="does not fit its tensors"):
        load_checkpoint(path)


def test_a_fine_tuned_backbone_travels_with_its_head(tmp_path):
    head, info = heads()["multi"]
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    path = tmp_path / "finetuned.safetensors"
    save_checkpoint(path, head, ModelCard.from_dict(info), backbone=backbone)
    loaded = load_checkpoint(path)
    assert loaded.backbone_state.keys() == backbone.state_dict().keys()
    for name, tensor in backbone.state_dict().items():
        assert torch.equal(loaded.backbone_state[name], tensor)
    assert loaded.head.state_dict().keys() == head.state_dict().keys()  # no backbone tensor
