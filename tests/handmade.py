"""Model files made by hand for fast tests: a real EfficientNet-Lite0 backbone at 64 pixels
(last map (320, 2, 2), a 2 x 2 grid) and a lab grid head whose last layers have zero weights and
chosen biases, so that every cell predicts a known box and class whatever the image."""

from __future__ import annotations

import functools
import math
from dataclasses import replace
from pathlib import Path

import torch

from pipeline_lib.boxes.geometry import ImageSpec
from pipeline_lib.features.backbones import Backbone, load_backbone
from pipeline_lib.models.checkpoints import save_checkpoint
from pipeline_lib.models.headkinds import build_head
from pipeline_lib.models.heads import MlpGridHead
from pipeline_lib.models.modelcard import GridSpec, ModelCard

SIZE = 64  # Lite0's last map at 64 pixels: (320, 2, 2)
CELL_BOX = (0.5, 0.5, 0.25, 0.5)  # every cell: centred in the cell, 0.25 x 0.5 of the image


@functools.cache
def lite0() -> Backbone:
    """Loaded at the first test, not at import: mutmut forks its test processes from one that
    imported the tests, and torch must not have started its threads there."""
    return load_backbone("efficientnet_lite0")


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def grid_card(classes: list[str], **changes) -> ModelCard:
    """A 2 x 2 lab grid head on Lite0 at 64 pixels, features stored in float16."""
    card = ModelCard(
        "multi",
        {"hidden": 8, "dropout": 0.0},
        list(classes),
        [320, 2, 2],
        "float16",
        lite0().describe(),
        ImageSpec("shrink", SIZE),
        grid=GridSpec(2),
    )
    return replace(card, **changes)


def set_grid_outputs(head: MlpGridHead, label: int = 0) -> None:
    """Every cell: CELL_BOX, class logit 2 for `label` and 0 for the others, objectness 3."""
    boxes, classes = head.regression[-2], head.classification[-1]
    with torch.no_grad():
        boxes.weight.zero_()
        boxes.bias.copy_(torch.tensor([logit(v) for v in CELL_BOX]))
        classes.weight.zero_()
        classes.bias.zero_()
        classes.bias[label] = 2.0
        classes.bias[-1] = 3.0


def write_model(
    path: Path, card: ModelCard, backbone: torch.nn.Module | None = None, label: int = 0
) -> Path:
    """Save a head for `card` (outputs set by hand for a lab grid head) and return `path`."""
    head = build_head(card)
    if isinstance(head, MlpGridHead):
        set_grid_outputs(head, label)
    save_checkpoint(path, head, card, backbone)
    return path
