"""Evaluation measures, as pure functions of predictions and targets (tensors in, numbers out)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.ops import box_iou

from pipeline_lib.anchors import fold_anchors
from pipeline_lib.geometry import decode_boxes, paired_iou


def encoded_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N,) IoU of (N, 4) encoded boxes with their targets.

    IoU does not change when both axes are scaled, so fractions of the image give the IoU in
    pixels (and, under `shrink`, in the original image too).
    """
    return paired_iou(decode_boxes(pred.double(), 1, 1), decode_boxes(target.double(), 1, 1))


def single_object_batch_sums(
    outputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]
) -> dict[str, tuple[float, float]]:
    """(sum, count) per batch for training curves: class accuracy and IoU, per image."""
    pred_boxes, logits = outputs
    boxes, labels = targets
    n = len(labels)
    return {
        "accuracy": (float((logits.argmax(dim=1) == labels).sum()), n),
        "iou": (float(encoded_iou(pred_boxes, boxes).sum()), n),
    }


def multi_object_batch_sums(
    outputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]
) -> dict[str, tuple[float, float]]:
    """(sum, count) per batch for training curves, over the object cells: class accuracy and IoU
    of the cell's box; over all cells: objectness accuracy (logit > 0 <=> object). With anchors,
    a cell is a cell's anchor slot; with two levels (4 outputs, 6 targets), both levels count."""
    if len(outputs) == 4:
        coarse = multi_object_batch_sums(outputs[:2], targets[:3])
        fine = multi_object_batch_sums(outputs[2:], targets[3:])
        return {k: (coarse[k][0] + fine[k][0], coarse[k][1] + fine[k][1]) for k in coarse}
    pred_boxes, logits, boxes, has_obj, labels = fold_anchors(*outputs, *targets)
    mask = has_obj.bool()
    n_obj = int(mask.sum())
    correct = (logits[:, :-1].argmax(dim=1) == labels) & mask
    # Centres are in cell units: divided by S they are image fractions up to the cell's offset,
    # which both boxes share and IoU ignores.
    scale = torch.tensor([1 / mask.shape[-1]] * 2 + [1.0, 1.0])
    pred = pred_boxes.permute(0, 2, 3, 1)[mask] * scale
    true = boxes.permute(0, 2, 3, 1)[mask] * scale
    obj_correct = ((logits[:, -1] > 0) == mask).sum()
    return {
        "accuracy": (float(correct.sum()), n_obj),
        "iou": (float(encoded_iou(pred, true).sum()), n_obj),
        "obj_accuracy": (float(obj_correct), mask.numel()),
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


@dataclass
class ClassAP:
    """Average precision of one class. `ap` is None for a class with no (non-difficult) ground
    truth: it is left out of the mean."""

    ap: float | None  # all-point interpolation (VOC2010+)
    ap11: float | None  # 11-point interpolation (VOC2007)
    precision: list[float]
    recall: list[float]
    positives: int  # non-difficult ground-truth objects
    detections: int


def average_precision(recall: torch.Tensor, precision: torch.Tensor, eleven_point: bool) -> float:
    """AP from a ranked list's recall and precision, as the VOC devkit computes it.

    all-point: area under the precision envelope (precision made non-increasing from the right);
    11-point: mean over t in {0, 0.1, ..., 1} of the best precision at recall >= t (0 if none).
    """
    recall, precision = recall.double(), precision.double()
    if eleven_point:
        points = []
        for t in torch.linspace(0, 1, 11, dtype=torch.float64):
            reached = precision[recall >= t - 1e-12]
            points.append(reached.max() if len(reached) else torch.tensor(0.0))
        return float(torch.stack(points).mean())
    mrec = torch.cat([torch.tensor([0.0]), recall, torch.tensor([1.0])]).double()
    mpre = torch.cat([torch.tensor([0.0]), precision, torch.tensor([0.0])]).double()
    mpre = torch.flip(torch.cummax(torch.flip(mpre, [0]), 0).values, [0])
    changed = torch.nonzero(mrec[1:] != mrec[:-1]).flatten()
    return float(((mrec[changed + 1] - mrec[changed]) * mpre[changed + 1]).sum())


def voc_average_precision(
    detections: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    ground_truth: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    n_classes: int,
    iou_threshold: float = 0.5,
) -> list[ClassAP]:
    """Per-class AP over a set of images, with the PASCAL VOC devkit's matching rules.

    detections[n] = (boxes (D, 4) xyxy, scores (D,), labels (D,)) and ground_truth[n] =
    (boxes (G, 4) xyxy, labels (G,), difficult (G,) bool) for image n, in the same pixels.
    Per class, detections of all images are ranked by score (ties keep input order); each is
    matched to the ground-truth object of its image with which it has the highest IoU: a true
    positive if that IoU >= `iou_threshold` and the object was not matched before, a false
    positive otherwise; a match with a `difficult` object counts as neither. IoU is torchvision's
    (continuous coordinates; the devkit's MATLAB code adds 1 pixel to widths and heights).
    """
    results = []
    for k in range(n_classes):
        scores, hits, positives = [], [], 0
        for (d_boxes, d_scores, d_labels), (g_boxes, g_labels, g_difficult) in zip(
            detections, ground_truth, strict=True
        ):
            mine = g_labels == k
            gt, difficult = g_boxes[mine].double(), g_difficult[mine].bool()
            positives += int((~difficult).sum())
            dets = d_labels == k
            if not dets.any():
                continue
            boxes, s = d_boxes[dets].double(), d_scores[dets]
            order = torch.argsort(s, descending=True, stable=True)
            iou = box_iou(boxes[order], gt) if len(gt) else torch.zeros(len(order), 0)
            taken = torch.zeros(len(gt), dtype=torch.bool)
            for row, index in enumerate(order.tolist()):
                hit = 0  # false positive
                if iou.shape[1]:
                    best, g = iou[row].max(dim=0)
                    if best >= iou_threshold:
                        if difficult[g]:
                            hit = -1  # ignored
                        elif not taken[g]:
                            taken[g], hit = True, 1
                scores.append(float(s[index]))
                hits.append(hit)
        scores_t = torch.tensor(scores, dtype=torch.float64)
        hits_t = torch.tensor(hits, dtype=torch.int64)
        ranked = hits_t[torch.argsort(scores_t, descending=True, stable=True)]
        ranked = ranked[ranked >= 0]
        tp = torch.cumsum(ranked == 1, 0).double()
        fp = torch.cumsum(ranked == 0, 0).double()
        if positives == 0:
            results.append(ClassAP(None, None, [], [], 0, len(ranked)))
            continue
        recall = tp / positives
        precision = tp / (tp + fp).clamp(min=1e-12)
        results.append(ClassAP(
            average_precision(recall, precision, eleven_point=False),
            average_precision(recall, precision, eleven_point=True),
            precision.tolist(), recall.tolist(), positives, len(ranked),
        ))  # fmt: skip
    return results


def mean_ap(per_class: list[ClassAP], eleven_point: bool = False) -> float:
    """Mean of the defined per-class APs (0.0 if none is defined)."""
    values = [c.ap11 if eleven_point else c.ap for c in per_class if c.ap is not None]
    return float(sum(values) / len(values)) if values else 0.0


def coco_map(
    detections: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    ground_truth: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
) -> float:
    """COCO-style mAP@[.5:.95] (torchmetrics, faster-coco-eval backend), a second opinion.

    Same arguments as `voc_average_precision`; `difficult` objects are passed as COCO "crowd"
    regions, which COCO also ignores when matching.
    """
    from torchmetrics.detection import MeanAveragePrecision  # slow import, only when evaluating

    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="faster_coco_eval")
    metric.update(
        [{"boxes": b.float(), "scores": s.float(), "labels": k} for b, s, k in detections],
        [{"boxes": b.float(), "labels": k, "iscrowd": d.long()} for b, k, d in ground_truth],
    )
    return float(metric.compute()["map"])
