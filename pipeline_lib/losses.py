"""Training losses: each returns a dict of scalar tensors, "loss" (minimised) and its parts."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
