"""Training losses: each returns a dict of scalar tensors, "loss" (minimised) and its parts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from pipeline_lib.anchors import fold_anchors


def single_object_loss(
    pred_boxes: torch.Tensor,
    logits: torch.Tensor,
    boxes: torch.Tensor,
    labels: torch.Tensor,
    box_weight: float = 1.0,
    class_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Loss of the single-object head.

    pred_boxes, boxes: (B, 4) encoded (cx, cy, w, h); logits: (B, n_classes); labels: (B,) int64.
    box_loss is the lab's: SmoothL1 (beta 1) averaged over the B * 4 coordinates.
    """
    box = F.smooth_l1_loss(pred_boxes, boxes)
    cls = F.cross_entropy(logits, labels)
    return {"loss": box_weight * box + class_weight * cls, "box_loss": box, "class_loss": cls}


def multi_object_loss(
    pred_boxes: torch.Tensor,
    logits: torch.Tensor,
    boxes: torch.Tensor,
    has_obj: torch.Tensor,
    labels: torch.Tensor,
    box_weight: float = 1.0,
    class_weight: float = 1.0,
    obj_weight: float = 1.0,
    obj_loss: str = "bce",
    focal_gamma: float = 2.0,
    focal_alpha: float = 0.25,
) -> dict[str, torch.Tensor]:
    """Loss of the grid head: J = sum over object cells of (L_box + L_class) + L_obj.

    pred_boxes, boxes: (B, 4, S, S); logits: (B, n_classes + 1, S, S), the last channel being
    objectness; has_obj: (B, S, S) 0/1; labels: (B, S, S) int64. With A anchors every tensor has
    an anchor dimension after B (see `fold_anchors`), and "cell" below means a cell's anchor slot.
    box_loss (SmoothL1, mean over the 4 coordinates) and class_loss (cross-entropy) are averaged
    over the object cells of the batch, obj_loss (BCE, or torchvision's sigmoid focal loss with
    `obj_loss="focal"`) over all cells, so that the weights do not depend on S or on the batch.
    """
    pred_boxes, logits, boxes, has_obj, labels = fold_anchors(
        pred_boxes, logits, boxes, has_obj, labels
    )
    mask = has_obj.bool()
    n_obj = mask.sum().clamp(min=1)
    box = F.smooth_l1_loss(pred_boxes, boxes, reduction="none").mean(dim=1)
    box = (box * mask).sum() / n_obj
    cls = F.cross_entropy(logits[:, :-1], labels, reduction="none")
    cls = (cls * mask).sum() / n_obj
    objectness, target = logits[:, -1], has_obj.to(logits.dtype)
    if obj_loss == "focal":
        obj = sigmoid_focal_loss(objectness, target, focal_alpha, focal_gamma, reduction="mean")
    elif obj_loss == "bce":
        obj = F.binary_cross_entropy_with_logits(objectness, target)
    else:
        raise ValueError(f"obj_loss must be 'bce' or 'focal', got {obj_loss!r}")
    total = box_weight * box + class_weight * cls + obj_weight * obj
    return {"loss": total, "box_loss": box, "class_loss": cls, "obj_loss": obj}


def two_level_loss(
    outputs: tuple[torch.Tensor, ...], targets: tuple[torch.Tensor, ...], **weights
) -> dict[str, torch.Tensor]:
    """Loss of a two-level grid head: `multi_object_loss` of each level, summed part by part.

    outputs: (boxes, logits) of the main level then of the fine one (heads.TwoLevelHead);
    targets: (boxes, has_obj, labels) of each level in the same order; `weights` as for
    `multi_object_loss`.
    """
    coarse = multi_object_loss(*outputs[:2], *targets[:3], **weights)
    fine = multi_object_loss(*outputs[2:], *targets[3:], **weights)
    return {name: coarse[name] + fine[name] for name in coarse}
