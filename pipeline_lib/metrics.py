"""Evaluation measures, as pure functions of predictions and targets (tensors in, numbers out)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from pipeline_lib.geometry import decode_boxes, paired_iou


def encoded_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N,) IoU of (N, 4) encoded boxes with their targets.

    IoU does not change when both axes are scaled, so fractions of the image give the IoU in
    pixels (and, under `shrink`, in the original image too).
    """
    return paired_iou(decode_boxes(pred.double(), 1, 1), decode_boxes(target.double(), 1, 1))


def single_object_batch_sums(
    outputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]
) -> dict[str, float]:
    """Per-batch sums for training curves: correct classes ("accuracy") and IoU ("iou")."""
    pred_boxes, logits = outputs
    boxes, labels = targets
    return {
        "accuracy": float((logits.argmax(dim=1) == labels).sum()),
        "iou": float(encoded_iou(pred_boxes, boxes).sum()),
    }


def confusion_matrix(actual: torch.Tensor, predicted: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(n_classes, n_classes) int64 counts: row = actual class, column = predicted class."""
    index = actual.long() * n_classes + predicted.long()
    return torch.bincount(index, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def single_object_metrics(
    pred_boxes: torch.Tensor,
    logits: torch.Tensor,
    boxes: torch.Tensor,
    labels: torch.Tensor,
    classes: list[str],
    iou_threshold: float = 0.5,
) -> dict:
    """Metrics of the single-object task over N images.

    - box_loss: SmoothL1 averaged over the N * 4 encoded coordinates (the lab's definition),
    - accuracy: share of images whose largest object's class is predicted,
    - mean_iou: mean IoU of the predicted box with the true one,
    - hit_rate: share of images with IoU >= `iou_threshold` and the right class,
    - per_class_accuracy: accuracy over the images whose largest object is of that class
      (null for a class without such an image).
    """
    predicted = logits.argmax(dim=1)
    correct = predicted == labels
    iou = encoded_iou(pred_boxes, boxes)
    per_class = {}
    for k, name in enumerate(classes):
        mine = labels == k
        per_class[name] = round(float(correct[mine].float().mean()), 4) if mine.any() else None
    return {
        "images": len(labels),
        "box_loss": round(float(F.smooth_l1_loss(pred_boxes.float(), boxes.float())), 6),
        "class_loss": round(float(F.cross_entropy(logits.float(), labels)), 4),
        "accuracy": round(float(correct.float().mean()), 4),
        "mean_iou": round(float(iou.mean()), 4),
        "hit_rate": round(float((correct & (iou >= iou_threshold)).float().mean()), 4),
        "per_class_accuracy": per_class,
    }
