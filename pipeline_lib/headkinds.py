"""The one registry of head kinds: the model card's (task, head kind) -> the head it builds.

A card records its head's kind in `card.head["kind"]` (cards written before the lab's heads
recorded theirs read as "lab"). Everything else asks the head itself, never its type: every
head answers `detections(outputs, sizes, spec, keep)` (its outputs for B images -> each image's
detections in its own pixels) and every multi-object head `learnable_objects(card, prepared,
ids)` (what its assignment can learn: the recall bound); see `heads.SingleDecoding`,
`heads.GridDecoding` and `fcos.FcosHead`.

| task | kind | head (one level / with backbone.fine_layer) | fine-tuned |
|---|---|---|---|
| single | lab | `heads.SingleObjectHead` | no (single-object) |
| single | spatial | `heads.SpatialSingleHead` | no (single-object) |
| multi | lab | `heads.MultiObjectHead` / `heads.TwoLevelHead` | one level |
| multi | conv | `heads.ConvGridHead` / `heads.PyramidGridHead` | one level |
| multi | fcos | `fcos.FcosHead` (one or two levels) | no |
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from pipeline_lib.fcos import FcosHead
from pipeline_lib.heads import (
    ConvGridHead,
    MultiObjectHead,
    PyramidGridHead,
    SingleObjectHead,
    SpatialSingleHead,
    TwoLevelHead,
)
from pipeline_lib.modelcard import ModelCard

LAB = "lab"  # the kind of a card that names none (written before cards recorded the lab's)


@dataclass(frozen=True)
class HeadKind:
    """How to build a head from its card (fresh weights), and whether `finetune` trains it."""

    build: Callable[[ModelCard], nn.Module]
    finetunes: bool


def _config(card: ModelCard) -> dict:
    """The head's keyword arguments: the card's head description without its kind."""
    return {k: v for k, v in card.head.items() if k != "kind"}


def _shape(card: ModelCard) -> tuple[tuple[int, int, int], int]:
    return tuple(card.feature_shape), len(card.classes)


def _lab_single(card: ModelCard) -> nn.Module:
    return SingleObjectHead(*_shape(card), **_config(card))


def _spatial_single(card: ModelCard) -> nn.Module:
    return SpatialSingleHead(*_shape(card), **_config(card))


def _lab_grid(card: ModelCard) -> nn.Module:
    grid = card.grid
    if grid.fine_channels:
        return TwoLevelHead(*_shape(card), grid.fine_channels, grid.num_cells, **_config(card))
    return MultiObjectHead(*_shape(card), grid.num_cells, anchors=grid.anchors, **_config(card))


def _conv_grid(card: ModelCard) -> nn.Module:
    grid = card.grid
    if grid.fine_channels:
        return PyramidGridHead(*_shape(card), grid.fine_channels, grid.num_cells, **_config(card))
    return ConvGridHead(*_shape(card), grid.num_cells, anchors=grid.anchors, **_config(card))


def _fcos(card: ModelCard) -> nn.Module:
    return FcosHead(*_shape(card), card.image.size, card.grid.fine_channels, **_config(card))


HEAD_KINDS: dict[tuple[str, str], HeadKind] = {
    ("single", LAB): HeadKind(_lab_single, finetunes=False),
    ("single", "spatial"): HeadKind(_spatial_single, finetunes=False),
    ("multi", LAB): HeadKind(_lab_grid, finetunes=True),
    ("multi", "conv"): HeadKind(_conv_grid, finetunes=True),
    ("multi", "fcos"): HeadKind(_fcos, finetunes=False),
}


def head_kind(card: ModelCard) -> HeadKind:
    """The registry's entry for the card's head (ValueError naming the kinds known)."""
    key = (card.kind, card.head.get("kind", LAB))
    if key not in HEAD_KINDS:
        known = ", ".join(kind for task, kind in HEAD_KINDS if task == card.kind)
        raise ValueError(f"unknown {card.kind}-object head kind {key[1]!r} (known: {known})")
    return HEAD_KINDS[key]


def build_head(card: ModelCard) -> nn.Module:
    """The head a card describes, with fresh weights."""
    return head_kind(card).build(card)
