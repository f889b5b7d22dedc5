"""Training losses: each returns a dict of scalar tensors, "loss" (minimised) and its parts; a
head hands the training loop its `Objective` (its loss and its training measures)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.ops import box_convert, complete_box_iou_loss, sigmoid_focal_loss

from pipeline_lib.boxes.geometry import paired_iou
from pipeline_lib.boxes.gridcoding import cell_local, fold_anchors

Outputs = tuple[torch.Tensor, ...]
LossFn = Callable[[Outputs, Sequence[torch.Tensor]], dict[str, torch.Tensor]]
MeasureFn = Callable[[Outputs, Sequence[torch.Tensor]], dict[str, tuple[float, float]]]


@dataclass(frozen=True)
class Objective:
    """What a task plugs into the loop: `loss_fn` (minimised) and `measure_fn` (training curves)."""

    loss_fn: LossFn
    measure_fn: MeasureFn


@dataclass(frozen=True)
class LossWeights:
    """How the loss parts add up (params train.*): J = box_weight * L_box + class_weight * L_class
    (+ obj_weight * L_obj for the grid head, L_obj being BCE or the sigmoid focal loss).

    box_loss: smooth_l1 (the lab's, on the 4 coordinates) | ciou (1 - complete IoU of the boxes,
    torchvision's). obj_target: what an object cell's objectness learns, binary (1) | iou (the
    IoU of its predicted box with the truth, detached: scores that rank by box quality)."""

    box_weight: float = 1.0
    class_weight: float = 1.0
    obj_weight: float = 1.0
    obj_loss: str = "bce"  # bce | focal
    focal_gamma: float = 2.0
    focal_alpha: float = 0.25
    box_loss: str = "smooth_l1"  # smooth_l1 | ciou
    obj_target: str = "binary"  # binary | iou


def box_loss(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """(N,) loss of (N, 4) predicted boxes against their targets, both (cx, cy, w, h) in one
    frame (image fractions, or `gridcoding.cell_local` boxes of one cell): `smooth_l1` (beta 1,
    mean over the 4 coordinates) or `ciou` (1 - complete IoU: overlap, centre distance and aspect
    ratio; 0 for identical boxes, up to 2 for far apart ones)."""
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred, target, reduction="none").mean(dim=1)
    if kind == "ciou":
        corners = [box_convert(b.float(), "cxcywh", "xyxy") for b in (pred, target)]
        return complete_box_iou_loss(*corners, reduction="none")
    raise ValueError(f"box_loss must be 'smooth_l1' or 'ciou', got {kind!r}")


def single_object_loss(
    pred_boxes: torch.Tensor,
    logits: torch.Tensor,
    boxes: torch.Tensor,
    labels: torch.Tensor,
    weights: LossWeights = LossWeights(),
) -> dict[str, torch.Tensor]:
    """Loss of the single-object head.

    pred_boxes, boxes: (B, 4) encoded (cx, cy, w, h); logits: (B, n_classes); labels: (B,) int64.
    box_loss is the lab's, SmoothL1 (beta 1) averaged over the B * 4 coordinates, or with
    `weights.box_loss="ciou"` 1 - complete IoU averaged over the B boxes.
    """
    if weights.box_loss == "smooth_l1":  # the lab's, kept bit for bit
        box = F.smooth_l1_loss(pred_boxes, boxes)
    else:
        box = box_loss(pred_boxes, boxes, weights.box_loss).mean()
    cls = F.cross_entropy(logits, labels)
    total = weights.box_weight * box + weights.class_weight * cls
    return {"loss": total, "box_loss": box, "class_loss": cls}


def multi_object_loss(
    pred_boxes: torch.Tensor,
    logits: torch.Tensor,
    boxes: torch.Tensor,
    has_obj: torch.Tensor,
    labels: torch.Tensor,
    weights: LossWeights = LossWeights(),
) -> dict[str, torch.Tensor]:
    """Loss of the grid head: J = sum over object cells of (L_box + L_class) + L_obj.

    pred_boxes, boxes: (B, 4, S, S); logits: (B, n_classes + 1, S, S), the last channel being
    objectness; has_obj: (B, S, S) 0/1; labels: (B, S, S) int64. With A anchors every tensor has
    an anchor dimension after B (see `fold_anchors`), and "cell" below means a cell's anchor slot.
    box_loss (`box_loss`, on the cells' boxes as `gridcoding.cell_local` gives them) and
    class_loss (cross-entropy) are averaged over the object cells of the batch, obj_loss (BCE, or
    torchvision's sigmoid focal loss with `weights.obj_loss="focal"`) over all cells, so that the
    weights depend on neither S nor the batch. The objectness target of an object cell is 1, or
    with `weights.obj_target="iou"` the IoU of its predicted box with the truth (no gradient).
    """
    pred_boxes, logits, boxes, has_obj, labels = fold_anchors(
        pred_boxes, logits, boxes, has_obj, labels
    )
    w = weights
    mask = has_obj.bool()
    n_obj = mask.sum().clamp(min=1)
    # The object cells' boxes in one frame per cell: CIoU and the IoU target need them, the lab's
    # SmoothL1 with binary targets does not (then they are not built).
    if w.box_loss != "smooth_l1" or w.obj_target == "iou":
        pred = cell_local(pred_boxes.permute(0, 2, 3, 1)[mask], mask.shape[-1])
        true = cell_local(boxes.permute(0, 2, 3, 1)[mask], mask.shape[-1])
    if w.box_loss == "smooth_l1":  # the lab's, kept bit for bit (on the raw cell boxes)
        box = F.smooth_l1_loss(pred_boxes, boxes, reduction="none").mean(dim=1)
        box = (box * mask).sum() / n_obj
    else:
        box = box_loss(pred, true, w.box_loss).sum() / n_obj
    cls = F.cross_entropy(logits[:, :-1], labels, reduction="none")
    cls = (cls * mask).sum() / n_obj
    objectness, target = logits[:, -1], has_obj.to(logits.dtype)
    if w.obj_target == "iou":
        corners = [box_convert(b.detach(), "cxcywh", "xyxy") for b in (pred, true)]
        target = target.clone()
        target[mask] = paired_iou(*corners).to(target.dtype)
    elif w.obj_target != "binary":
        raise ValueError(f"obj_target must be 'binary' or 'iou', got {w.obj_target!r}")
    if w.obj_loss == "focal":
        alpha, gamma = w.focal_alpha, w.focal_gamma
        obj = sigmoid_focal_loss(objectness, target, alpha, gamma, reduction="mean")
    elif w.obj_loss == "bce":
        obj = F.binary_cross_entropy_with_logits(objectness, target)
    else:
        raise ValueError(f"obj_loss must be 'bce' or 'focal', got {w.obj_loss!r}")
    total = w.box_weight * box + w.class_weight * cls + w.obj_weight * obj
    return {"loss": total, "box_loss": box, "class_loss": cls, "obj_loss": obj}


def grid_loss(
    outputs: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    weights: LossWeights = LossWeights(),
) -> dict[str, torch.Tensor]:
    """Loss of a grid head of one or two levels: `multi_object_loss` of each level, summed part
    by part.

    outputs: (boxes, logits) of the main level, then of the fine one for a two-level head
    (heads.TwoLevelMlpHead); targets: (boxes, has_obj, labels) of each level in the same order.
    """
    if len(outputs) == 2:
        return multi_object_loss(*outputs, *targets, weights)
    coarse = multi_object_loss(*outputs[:2], *targets[:3], weights)
    fine = multi_object_loss(*outputs[2:], *targets[3:], weights)
    return {name: coarse[name] + fine[name] for name in coarse}
