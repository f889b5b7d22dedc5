"""Evaluation measures, as pure functions of predictions and targets (tensors in, numbers out)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import box_area, box_iou

from pipeline_lib.boxes.detection import Detections
from pipeline_lib.boxes.geometry import decode_boxes, paired_iou
from pipeline_lib.boxes.gridcoding import cell_local, fold_anchors


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
    # Both boxes of a cell share its offset, which IoU ignores.
    pred = cell_local(pred_boxes.permute(0, 2, 3, 1)[mask], mask.shape[-1])
    true = cell_local(boxes.permute(0, 2, 3, 1)[mask], mask.shape[-1])
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


def detection_confusion(
    detections: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    ground_truth: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    n_classes: int,
    iou_threshold: float = 0.5,
    overlap: str = "voc_inclusive_pixels",
) -> torch.Tensor:
    """(K + 1, K + 1) int64 counts of a detector's confusion, the last row and column the
    background: row = actual, column = predicted. Per image (arguments as
    `voc_average_precision`'s; filter the detections by score first), detection-object pairs
    overlapping from `iou_threshold` on are taken in order of overlap, whatever their classes,
    each detection and object once (as Ultralytics' ConfusionMatrix): a pair counts at (object's
    class, detection's class), an object left at (its class, background), a detection left at
    (background, its class), unless it overlaps a difficult object from the threshold on (then
    it counts for nothing, as difficult objects themselves)."""
    matrix = torch.zeros(n_classes + 1, n_classes + 1, dtype=torch.int64)
    for (boxes, _, labels), (g_boxes, g_labels, difficult) in zip(
        detections, ground_truth, strict=True
    ):
        difficult = difficult.bool()
        iou = box_overlap(g_boxes.double(), boxes.double(), overlap)  # (G, D)
        counted = iou[~difficult]
        actual = g_labels[~difficult].tolist()
        pairs = torch.nonzero(counted >= iou_threshold).tolist()
        pairs.sort(key=lambda gd: -float(counted[gd[0], gd[1]]))  # stable: ties in index order
        left_objects, left_detections = set(range(len(actual))), set(range(len(labels)))
        for g, d in pairs:
            if g in left_objects and d in left_detections:
                matrix[actual[g], labels[d]] += 1
                left_objects.discard(g)
                left_detections.discard(d)
        for g in left_objects:
            matrix[actual[g], n_classes] += 1
        near_difficult = (iou[difficult] >= iou_threshold).any(dim=0).tolist()
        for d in left_detections:
            if not near_difficult[d]:
                matrix[n_classes, labels[d]] += 1
    return matrix


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


def precision_envelope(precision: torch.Tensor) -> torch.Tensor:
    """(K,) precision of a ranked list -> (K,): at each rank the best precision at that rank or
    any later one (non-increasing), the interpolated precision that VOC AP integrates."""
    return torch.flip(torch.cummax(torch.flip(precision, [0]), 0).values, [0])


def all_point_ap(recall: torch.Tensor, precision: torch.Tensor) -> float:
    """VOC2010+ AP (the devkit's `VOCap.m`) of a ranked list's (K,) recall and precision: the
    area under the precision envelope, precision made non-increasing from the right."""
    mrec = torch.cat([torch.tensor([0.0]), recall.double(), torch.tensor([1.0])])
    mpre = torch.cat([torch.tensor([0.0]), precision.double(), torch.tensor([0.0])])
    mpre = precision_envelope(mpre)
    changed = torch.nonzero(mrec[1:] != mrec[:-1]).flatten()
    return float(((mrec[changed + 1] - mrec[changed]) * mpre[changed + 1]).sum())


# The recalls VOCevaldet.m samples: MATLAB's `0:0.1:1`, which MATLAB builds from both ends (a + k*d
# up to the middle, b - (n - k)*d after it), in double precision: the fourth point is
# 0.30000000000000004, so a recall of exactly 3/10 does not reach it, while the seventh and
# eighth are the doubles nearest 0.6 and 0.7 (py-faster-rcnn's np.arange(0., 1.1, 0.1) has
# 0.6000000000000001 and 0.7000000000000001 there).
ELEVEN_POINTS = tuple(k * 0.1 if k <= 5 else 1.0 - (10 - k) * 0.1 for k in range(11))


def eleven_point_ap(recall: torch.Tensor, precision: torch.Tensor) -> float:
    """VOC2007 AP (`VOCevaldet.m`) of a ranked list's (K,) recall and precision (float64, as
    the devkit's): the mean over the devkit's 11 recall points t (`ELEVEN_POINTS`) of the best
    precision at recall >= t (0 if none)."""
    points = [precision.double()[recall.double() >= t] for t in ELEVEN_POINTS]
    return sum(p.max().item() if len(p) else 0.0 for p in points) / len(points)


# How box overlap is measured, by the coordinate convention of the data source:
# - "voc_inclusive_pixels": VOC's 1-based pixel indices, xmax and ymax inclusive; the devkit's
#   VOCevaldet.m counts xmax - xmin + 1 columns (and rows), in the areas and the intersection;
# - "continuous": COCO's continuous coordinates, width = xmax - xmin (torchvision's box_iou).
OVERLAPS = ("voc_inclusive_pixels", "continuous")
OVERLAP_OF_SOURCE = {
    "voc": "voc_inclusive_pixels",
    "synthetic": "voc_inclusive_pixels",
    "coco": "continuous",
}


def voc_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """(N, M) IoU of (N, 4) and (M, 4) xyxy boxes on inclusive pixels, as the VOC devkit.

    A box (x1, y1, x2, y2) covers x2 - x1 + 1 columns and y2 - y1 + 1 rows, and so does the
    intersection; boxes whose intersection has no positive side overlap 0. This equals
    torchvision's `box_iou` of the boxes with their max corner moved out by one pixel, with the
    same operations in the same order (inter / (area1 + area2 - inter)), hence the same floats.
    E.g. (1, 1, 10, 10) and (1, 1, 10, 5): 50 / 100 = 0.5 (continuous IoU: 36 / 81).
    """
    one = boxes1.new_tensor([0, 0, 1, 1])
    return box_iou(boxes1 + one, boxes2 + one)


def box_overlap(boxes1: torch.Tensor, boxes2: torch.Tensor, overlap: str) -> torch.Tensor:
    """(N, M) IoU of xyxy boxes under `overlap`, one of OVERLAPS."""
    if overlap == "voc_inclusive_pixels":
        return voc_box_iou(boxes1, boxes2)
    if overlap == "continuous":
        return box_iou(boxes1, boxes2)
    raise ValueError(f"overlap must be one of {OVERLAPS}, got {overlap!r}")


# A detection's outcome under the devkit's matching (`match_image`): it found an object, it is a
# false positive, or it counts as neither (it matched a difficult object).
TRUE_POSITIVE, FALSE_POSITIVE, IGNORED = 1, 0, -1


def match_image(
    detections: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    truth: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    iou_threshold: float = 0.5,
    overlap: str = "voc_inclusive_pixels",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's detections matched with its objects by the PASCAL VOC devkit's rules.

    detections = (boxes (D, 4) xyxy, scores (D,), labels (D,)), truth = (boxes (G, 4) xyxy,
    labels (G,), difficult (G,) bool), in the same pixels. Per class, the detections in score
    order (ties keep input order) each take the object of their class they overlap most (the
    first of equal maxima): from `iou_threshold` on, the first to take an object finds it, a
    later one is a false positive, and one that takes a difficult object counts as neither.
    Returns (outcome (D,) int8: TRUE_POSITIVE, FALSE_POSITIVE or IGNORED; object (D,) int64:
    the index in `truth` of the object taken, -1 where none reaches the threshold)."""
    boxes, scores, labels = detections
    g_boxes, g_labels, g_difficult = truth
    outcome = torch.full((len(scores),), FALSE_POSITIVE, dtype=torch.int8)
    taken_by = torch.full((len(scores),), -1, dtype=torch.int64)
    for k in labels.unique().tolist():
        objects = torch.nonzero(g_labels == k).flatten()
        if not len(objects):
            continue
        mine = torch.nonzero(labels == k).flatten()
        mine = mine[torch.argsort(scores[mine], descending=True, stable=True)]
        iou = box_overlap(boxes[mine].double(), g_boxes[objects].double(), overlap)
        best = iou.argmax(dim=1)  # the first of equal maxima, as the devkit
        reached = (iou.gather(1, best[:, None])[:, 0] >= iou_threshold).tolist()
        chosen = objects[best].tolist()
        difficult = g_difficult.bool().tolist()
        taken: set[int] = set()
        for detection, g, hit in zip(mine.tolist(), chosen, reached, strict=True):
            if not hit:
                continue
            taken_by[detection] = g
            if difficult[g]:
                outcome[detection] = IGNORED
            elif g not in taken:
                outcome[detection] = TRUE_POSITIVE
                taken.add(g)
    return outcome, taken_by


def voc_average_precision(
    detections: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    ground_truth: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    n_classes: int,
    iou_threshold: float = 0.5,
    overlap: str = "voc_inclusive_pixels",
    unmatched_ignored: list[torch.Tensor] | None = None,
) -> list[ClassAP]:
    """Per-class AP over a set of images, with the PASCAL VOC devkit's matching rules.

    detections[n] = (boxes (D, 4) xyxy, scores (D,), labels (D,)) and ground_truth[n] =
    (boxes (G, 4) xyxy, labels (G,), difficult (G,) bool) for image n, in the same pixels, matched
    per image by `match_image`: a true positive, a false positive, or neither (a difficult
    object). Per class, the detections of all images are then ranked by score (ties keep input
    order). `overlap` (see OVERLAPS) is the devkit's inclusive-pixel IoU by default.
    `unmatched_ignored[n]` ((D,) bool, optional): those detections of image n count as neither
    when they are not a true positive (COCO's rule for detections outside an area range).
    """
    if overlap not in OVERLAPS:
        raise ValueError(f"overlap must be one of {OVERLAPS}, got {overlap!r}")
    if unmatched_ignored is None:
        unmatched_ignored = [torch.zeros(len(d[1]), dtype=torch.bool) for d in detections]
    scores: list[list[float]] = [[] for _ in range(n_classes)]
    hits: list[list[bool]] = [[] for _ in range(n_classes)]
    positives = [0] * n_classes
    for dets, truth, ignored in zip(detections, ground_truth, unmatched_ignored, strict=True):
        outcome, _ = match_image(dets, truth, iou_threshold, overlap)
        _, g_labels, g_difficult = truth
        counted = torch.bincount(g_labels[~g_difficult.bool()], minlength=n_classes)
        for k in range(n_classes):
            positives[k] += int(counted[k])
        hit = outcome == TRUE_POSITIVE
        kept = (outcome != IGNORED) & (hit | ~ignored.bool())
        for score, label, found in zip(
            dets[1][kept].tolist(), dets[2][kept].tolist(), hit[kept].tolist(), strict=True
        ):
            scores[label].append(score)
            hits[label].append(found)
    return [_class_ap(scores[k], hits[k], positives[k]) for k in range(n_classes)]


# Object sizes by area in the original image's pixels, COCO's ranges (VOC photos, about 500 x 375,
# are of COCO's scale): small below 32^2, medium to 96^2, large above.
SIZE_RANGES = {"small": (0.0, 32.0**2), "medium": (32.0**2, 96.0**2), "large": (96.0**2, math.inf)}


def ap_by_size(
    detections: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    ground_truth: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    n_classes: int,
    iou_threshold: float = 0.5,
    overlap: str = "voc_inclusive_pixels",
) -> dict[str, list[ClassAP]]:
    """Per SIZE_RANGES name, per-class AP (`voc_average_precision`) counting only the objects of
    that size, as COCO does: objects of other sizes are ignored like difficult ones (a detection
    matching one counts as neither), and so are the detections of other sizes that match no
    object of this size."""
    found = {}
    for name, (low, high) in SIZE_RANGES.items():
        truth = []
        for boxes, labels, difficult in ground_truth:
            area = box_area(boxes.double())
            truth.append((boxes, labels, difficult.bool() | (area < low) | (area >= high)))
        outside = []
        for boxes, _, _ in detections:
            area = box_area(boxes.double())
            outside.append((area < low) | (area >= high))
        found[name] = voc_average_precision(
            detections, truth, n_classes, iou_threshold, overlap, outside
        )
    return found


def _class_ap(scores: list[float], hits: list[bool], positives: int) -> ClassAP:
    """AP of one class from its (non-ignored) detections' scores and whether each is a true
    positive, with `positives` (non-difficult) objects to find."""
    if positives == 0:
        return ClassAP(None, None, [], [], 0, len(hits))
    order = torch.argsort(torch.tensor(scores, dtype=torch.float64), descending=True, stable=True)
    ranked = torch.tensor(hits, dtype=torch.bool)[order]
    tp = torch.cumsum(ranked, 0).double()
    fp = torch.cumsum(~ranked, 0).double()
    recall, precision = tp / positives, tp / (tp + fp)
    return ClassAP(
        all_point_ap(recall, precision),
        eleven_point_ap(recall, precision),
        precision.tolist(),
        recall.tolist(),
        positives,
        len(hits),
    )


def mean_ap(per_class: list[ClassAP], eleven_point: bool = False) -> float:
    """Mean of the defined per-class APs (0.0 if none is defined)."""
    values = [c.ap11 if eleven_point else c.ap for c in per_class if c.ap is not None]
    return float(sum(values) / len(values)) if values else 0.0


# COCO's IoU thresholds 0.5, 0.55, ..., 0.95 and recall points 0, 0.01, ..., 1, computed as
# pycocotools computes them (np.linspace: a threshold is not always exactly k / 100, and a recall
# that lands on one is counted as COCO counts it).
COCO_IOUS = torch.from_numpy(np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1))
COCO_RECALLS = torch.from_numpy(np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1))
COCO_MAX_DETECTIONS = 100  # per image and class, COCO's maxDets for its headline mAP


def coco_match_image(
    detections: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    truth: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """One image's detections matched with its objects as COCO's evaluation does (pycocotools'
    `evaluateImg`, area range "all"), at each of COCO_IOUS: (D, 10) int8 outcomes TRUE_POSITIVE,
    FALSE_POSITIVE or IGNORED.

    Same arguments as `match_image`; `difficult` objects are COCO's crowd regions. Per class, the
    COCO_MAX_DETECTIONS best detections in score order each take the best-overlapping object of
    their class not taken yet (continuous IoU; the later of equal overlaps) from the threshold on;
    a crowd region may be taken again, overlaps it by intersection over the detection's area,
    and its detections count as neither. Detections beyond the cap are not counted (IGNORED)."""
    boxes, scores, labels = detections
    g_boxes, g_labels, crowd = truth
    outcome = torch.full((len(scores), len(COCO_IOUS)), IGNORED, dtype=torch.int8)
    for k in labels.unique().tolist():
        mine = torch.nonzero(labels == k).flatten()
        mine = mine[torch.argsort(scores[mine], descending=True, stable=True)]
        mine = mine[:COCO_MAX_DETECTIONS]
        objects = torch.nonzero(g_labels == k).flatten()
        objects = objects[torch.argsort(crowd[objects].to(torch.uint8), stable=True)]  # crowd last
        d, g = boxes[mine].double(), g_boxes[objects].double()
        is_crowd = crowd[objects].bool().tolist()
        sides = (
            torch.minimum(d[:, None, 2:], g[None, :, 2:])
            - torch.maximum(d[:, None, :2], g[None, :, :2])
        ).clamp(min=0)
        inter = sides[..., 0] * sides[..., 1]
        own, other = box_area(d)[:, None], box_area(g)[None, :]
        union = torch.where(crowd[objects].bool()[None, :], own, own + other - inter)
        iou = torch.where(union > 0, inter / union, 0.0)
        # The objects a detection may take at some threshold (overlap >= the lowest), in order:
        # the others never pass pycocotools' `iou < best` test.
        candidates = [
            [(j, value) for j, value in enumerate(row) if value >= COCO_IOUS[0]]
            for row in iou.tolist()
        ]
        outcome[mine] = FALSE_POSITIVE
        for t, threshold in enumerate(COCO_IOUS.tolist()):
            taken = [False] * len(objects)
            for detection, options in zip(mine.tolist(), candidates, strict=True):
                best, m = min(threshold, 1 - 1e-10), -1
                for j, value in options:
                    if taken[j] and not is_crowd[j]:
                        continue
                    if m > -1 and not is_crowd[m] and is_crowd[j]:
                        break
                    if value < best:
                        continue
                    best, m = value, j
                if m == -1:
                    continue
                taken[m] = True
                outcome[detection, t] = IGNORED if is_crowd[m] else TRUE_POSITIVE
    return outcome


# (boxes, labels, difficult) of each image
Truth = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def round_ap(value: float | None) -> float | None:
    """An AP as the reports write it: 4 digits, None kept."""
    return None if value is None else round(value, 4)


@dataclass
class VocSummary:
    """Per-class VOC AP of one model on a set of images."""

    classes: list[str]
    per_class: list[ClassAP]

    def map(self, eleven_point: bool = False) -> float:
        return mean_ap(self.per_class, eleven_point)

    def per_class_ap(self, eleven_point: bool = False) -> dict[str, float | None]:
        """{class: AP rounded to 4 digits, None for a class without objects}."""
        values = [c.ap11 if eleven_point else c.ap for c in self.per_class]
        return {name: round_ap(v) for name, v in zip(self.classes, values, strict=True)}


def voc_summary(
    found: list[Detections], truth: Truth, classes: list[str], iou: float, overlap: str
) -> VocSummary:
    """VOC AP per class of `found` against `truth` at overlap `iou` (see metrics.OVERLAPS)."""
    detections = [d.as_tuple() for d in found]
    return VocSummary(classes, voc_average_precision(detections, truth, len(classes), iou, overlap))
