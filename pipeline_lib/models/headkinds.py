"""The one registry of head kinds: the model card's (task, head kind) -> what makes that head.

A card records its head's kind in `card.head["kind"]` (cards written before the lab's heads
recorded theirs read as "lab"). The registry knows how to describe a kind on a card from params
head.* and grid.*, how to build it from a card, and how to make its targets; everything else asks
the head itself, never its type. Every head answers:
- `objective(weights)`: its loss and training measures (`losses.Objective`),
- `detections(outputs, sizes, spec, keep)`: its outputs for B images -> each image's detections
  in its own pixels,
- and every multi-object head `learnable_objects(card, prepared, ids)`: how many objects its
  assignment can learn (the recall bound).
(`heads.SingleContract`, `heads.GridContract`, `fcos.FcosHead`, `retinanet.RetinaNetHead`.)

| task | kind | head (one level / with backbone.fine_layer) | targets |
|---|---|---|---|
| single | lab | `heads.MlpSingleHead` | the largest object |
| single | spatial | `heads.SpatialSingleHead` | the largest object |
| multi | lab | `heads.MlpGridHead` / `heads.TwoLevelMlpHead` | `targets.grid_targets` |
| multi | conv | `heads.ConvGridHead` / `heads.PyramidGridHead` | `targets.grid_targets` |
| multi | fcos | `fcos.FcosHead` (one or two levels) | `targets.box_targets` |
| multi | retinanet | `retinanet.RetinaNetHead` (one or two levels) | `targets.box_targets` |

Adding a kind: its module (the nn.Module with the three answers, a `build` and an `entry`), one
line here, its name in params.HeadParams.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from pipeline_lib.base.params import GridParams, HeadParams
from pipeline_lib.models import fcos, heads, retinanet
from pipeline_lib.models.modelcard import GridSpec, ModelCard
from pipeline_lib.models.targets import Objects, box_targets, grid_targets

LAB = "lab"  # the kind of a card that names none (written before cards recorded the lab's)

Layout = Callable[[GridParams, int, list[int], list | None], GridSpec]
Targets = Callable[[ModelCard, list[Objects]], tuple[torch.Tensor, ...]]


@dataclass(frozen=True)
class HeadKind:
    """What makes a head of one kind.

    build: its card -> the head, fresh weights. entry: params head.* -> the card's `head`
    description (the head's keyword arguments and its kind). For multi-object kinds, layout:
    (params grid.*, the fine level's channels (0: one level), the feature shape, the k-means
    anchors or None) -> the card's GridSpec; targets: (card, `Objects` of N images) -> the
    targets of those N images, in the order its loss takes them (a module-level function:
    DataLoader workers call it).
    """

    build: Callable[[ModelCard], nn.Module]
    entry: Callable[[HeadParams], dict]
    layout: Layout | None = None
    targets: Targets | None = None


HEAD_KINDS: dict[tuple[str, str], HeadKind] = {
    ("single", LAB): HeadKind(heads.build_mlp_single, heads.mlp_single_entry),
    ("single", "spatial"): HeadKind(
        heads.build_spatial_single, partial(heads.conv_entry, "spatial")
    ),
    ("multi", LAB): HeadKind(
        heads.build_mlp_grid, heads.mlp_grid_entry, heads.best_anchor_layout, grid_targets
    ),
    ("multi", "conv"): HeadKind(
        heads.build_conv_grid,
        partial(heads.conv_entry, "conv"),
        heads.close_anchors_layout,
        grid_targets,
    ),
    ("multi", "fcos"): HeadKind(fcos.build_fcos, fcos.fcos_entry, heads.levels_layout, box_targets),
    ("multi", "retinanet"): HeadKind(
        retinanet.build_retinanet, retinanet.retinanet_entry, heads.levels_layout, box_targets
    ),
}


def kind_named(task: str, kind: str) -> HeadKind:
    """The registry's entry for a `task` ("single" / "multi") head of `kind` (ValueError naming
    the kinds known)."""
    if (task, kind) not in HEAD_KINDS:
        known = ", ".join(name for t, name in HEAD_KINDS if t == task)
        raise ValueError(f"unknown {task}-object head kind {kind!r} (known: {known})")
    return HEAD_KINDS[task, kind]


def head_kind(card: ModelCard) -> HeadKind:
    """The registry's entry for the card's head."""
    return kind_named(card.kind, card.head.get("kind", LAB))


def build_head(card: ModelCard) -> nn.Module:
    """The head a card describes, with fresh weights."""
    return head_kind(card).build(card)
