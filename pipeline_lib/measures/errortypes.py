"""Where a detector errs: TIDE's split of its errors (Bolya et al., ECCV 2020), on the devkit's AP.

Every detection that finds no object gets one error type, tested in TIDE's order (its reference
implementation, dbolya/tide `tidecv/quantify.py`), with IoU `foreground` 0.5 and `background` 0.1
against the image's objects (difficult ones are TIDE's ignore regions: left out):
- localisation: the best overlap with an object of its class is in [background, foreground];
- classification: it overlaps an object of another class from foreground on;
- duplicate: it overlaps from foreground on an object of its class already found;
- background: no object overlaps it above background;
- both: none of these (a wrong class and a poor box at once);
and every object no detection finds, and no localisation or classification error could find,
is missed. Each type's *gain* is the mAP won if that type alone were fixed: a localisation or
classification error becomes a true positive (of the object's class; the best-scored one per
object, the others are dropped, as TIDE's BestGTMatch), the other false positives are dropped, a
missed object stops counting. TIDE itself (tidecv on PyPI, last released 2020) matches as COCO
and integrates 101 recall points, needs OpenCV and pycocotools, and loops in Python over
dictionaries; `DEVKIT` gives the split on this project's VOC AP, `TIDE` reproduces tidecv's own
figures (tests/test_errortypes.py checks them against it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pipeline_lib.measures.metrics import (
    TRUE_POSITIVE,
    _class_ap,
    box_overlap,
    match_image,
    mean_ap,
    precision_envelope,
)

ERROR_TYPES = ("classification", "localisation", "both", "duplicate", "background", "missed")
BACKGROUND_IOU = 0.1  # TIDE's: below this overlap with every object, a detection is background
# How a review names the errors of each type, in a sentence ("fewer localisation errors").
ERROR_NAMES = {
    "classification": "classification errors",
    "localisation": "localisation errors",
    "both": "errors of class and box at once",
    "duplicate": "duplicate detections",
    "background": "detections on the background",
    "missed": "missed objects",
}
Pair = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Scoring:
    """How detections become true and false positives, and how their AP is averaged.

    `match(detections, truth, foreground, overlap)`: one image's (outcome (D,) int8 as
    metrics.match_image's, with IGNORED for detections that count for nothing, object (D,) the
    index in `truth` of the object taken or -1); `mean_ap(scores, hits, positives)`: per-class
    lists -> the mean AP."""

    name: str
    match: Callable[[Pair, Pair, float, str], tuple[torch.Tensor, torch.Tensor]]
    mean_ap: Callable[[list[list[float]], list[list[bool]], list[int]], float]


def _devkit_mean(scores, hits, positives) -> float:
    per_class = [_class_ap(s, h, p) for s, h, p in zip(scores, hits, positives, strict=True)]
    return mean_ap(per_class)


def _tide_match(detections: Pair, truth: Pair, foreground: float, overlap: str):
    """TIDE's matching (quantify.py's TIDEExample): over the image's detections in score order
    (its 100 best), each takes the object of its class not taken yet that it overlaps most (the
    first of equal maxima) from `foreground` on."""
    boxes, scores, labels = detections
    g_boxes, g_labels, _ = truth
    outcome = torch.zeros(len(scores), dtype=torch.int8)
    taken_by = torch.full((len(scores),), -1, dtype=torch.int64)
    order = torch.argsort(scores, descending=True, stable=True)
    outcome[order[100:]] = -1  # TIDE's max_dets: the rest count for nothing
    iou = box_overlap(boxes.double(), g_boxes.double(), overlap)
    iou = iou * (labels[:, None] == g_labels[None, :])
    for d in order[:100].tolist():
        if not len(g_boxes):
            break
        g = int(iou[d].argmax())
        if iou[d, g] >= foreground:
            outcome[d], taken_by[d] = TRUE_POSITIVE, g
            iou[:, g] = 0
    return outcome, taken_by


def _tide_mean(scores, hits, positives) -> float:
    """tidecv's ap.py: per class, precision made non-increasing, read at the first rank reaching
    each recall k / 100 (0 where none does), averaged; 0 for a class without objects; the mean
    over the classes with objects or detections."""
    aps = []
    for s, h, p in zip(scores, hits, positives, strict=True):
        if not s and not p:
            continue
        if not p:
            aps.append(0.0)
            continue
        order = torch.argsort(torch.tensor(s, dtype=torch.float64), descending=True, stable=True)
        ranked = torch.tensor(h, dtype=torch.bool)[order]
        tp = torch.cumsum(ranked, 0).double()
        precision = precision_envelope(tp / torch.arange(1, len(ranked) + 1, dtype=torch.float64))
        points = torch.tensor([k / 100 for k in range(101)], dtype=torch.float64)
        first = torch.searchsorted(tp / p, points)
        values = [float(precision[i]) if i < len(precision) else 0.0 for i in first.tolist()]
        aps.append(sum(values) / len(values))
    return sum(aps) / len(aps) if aps else 0.0


DEVKIT = Scoring("devkit", match_image, _devkit_mean)
TIDE = Scoring("tide", _tide_match, _tide_mean)


@dataclass
class ErrorSplit:
    """The mAP the split starts from, and per ERROR_TYPES the mAP gained by fixing that type
    alone (never below 0, as TIDE) and how many errors of it there are."""

    map: float
    gains: dict[str, float]
    counts: dict[str, int]


@dataclass
class _Error:
    kind: str | None  # one of ERROR_TYPES, None for a true positive
    label: int  # the class of its AP entry as it is (a missed object: the object's class)
    score: float
    fixed_label: int | None = None  # the class it finds once fixed, if it can find an object
    object: tuple[int, int] | None = None  # (image, object) that fix finds


def split_errors(
    detections: list[Pair],
    truth: list[Pair],
    n_classes: int,
    scoring: Scoring = DEVKIT,
    overlap: str = "voc_inclusive_pixels",
    foreground: float = 0.5,
    background: float = BACKGROUND_IOU,
) -> ErrorSplit:
    """TIDE's error split (see the module docstring) of `detections` against `truth`, per image
    as metrics.voc_average_precision takes them."""
    entries: list[_Error] = []  # per image, in score order: true positives (kind None), errors
    positives = [0] * n_classes
    best: dict[tuple[int, int], tuple[float, int]] = {}  # object -> (score, error that fixes it)
    for n, (dets, objs) in enumerate(zip(detections, truth, strict=True)):
        boxes, scores, labels = dets
        keep = ~objs[2].bool()  # difficult objects are TIDE's ignore regions
        g_boxes, g_labels = objs[0][keep], objs[1][keep]
        for k in g_labels.tolist():
            positives[k] += 1
        outcome, taken = scoring.match(dets, objs, foreground, overlap)
        used = torch.zeros(len(objs[1]), dtype=torch.bool)
        used[taken[outcome == TRUE_POSITIVE]] = True
        used = used[keep]
        iou = box_overlap(boxes.double(), g_boxes.double(), overlap).tolist()
        same = (labels[:, None] == g_labels[None, :]).tolist()
        used_list, objects = used.tolist(), g_labels.tolist()
        usable = [False] * len(objects)
        outcomes, labels_list, scores_list = outcome.tolist(), labels.tolist(), scores.tolist()
        for d in torch.argsort(scores, descending=True, stable=True).tolist():
            label, score = labels_list[d], float(scores_list[d])
            if outcomes[d] == TRUE_POSITIVE:
                entries.append(_Error(None, label, score))
                continue
            if outcomes[d] < 0:
                continue  # counts for nothing (it matched a difficult object)
            kind, g = _error_type(iou[d], same[d], used_list, foreground, background)
            error = _Error(kind, label, score)
            if g is not None and not used_list[g]:  # a fix can find this object
                error.fixed_label, error.object = objects[g], (n, g)
                usable[g] = True
                if error.object not in best or best[error.object][0] < score:
                    best[error.object] = (score, len(entries))
            entries.append(error)
        entries += [
            _Error("missed", k, 0.0)
            for k, found, could in zip(objects, used_list, usable, strict=True)
            if not found and not could
        ]
    fixes = {i for _, i in best.values()}

    def fixed_map(kind: str | None) -> float:
        scores: list[list[float]] = [[] for _ in range(n_classes)]
        hits: list[list[bool]] = [[] for _ in range(n_classes)]
        objects = list(positives)
        for i, error in enumerate(entries):
            if error.kind is None:  # a true positive
                scores[error.label].append(error.score)
                hits[error.label].append(True)
            elif error.kind == "missed":
                objects[error.label] -= error.kind == kind
            elif error.kind != kind:
                scores[error.label].append(error.score)
                hits[error.label].append(False)
            elif i in fixes:  # the best-scored fix of its object; the other fixes are dropped
                scores[error.fixed_label].append(error.score)
                hits[error.fixed_label].append(True)
        return scoring.mean_ap(scores, hits, objects)

    start = fixed_map(None)
    gains = {kind: max(fixed_map(kind) - start, 0.0) for kind in ERROR_TYPES}
    counts = {kind: sum(e.kind == kind for e in entries) for kind in ERROR_TYPES}
    return ErrorSplit(start, gains, counts)


def _error_type(
    iou: list[float], same: list[bool], used: list[bool], foreground: float, background: float
) -> tuple[str, int | None]:
    """TIDE's tests, in its order, of a detection that found nothing: (its error type, the
    object a localisation or classification fix would find, else None). `iou` its overlap with
    each of the image's objects, `same` whether each is of its class, `used` whether found."""
    if not iou:
        return "background", None
    own = [v if s else 0.0 for v, s in zip(iou, same, strict=True)]
    g = _first_max(own)
    if background <= own[g] <= foreground:
        return "localisation", g
    other = [0.0 if s else v for v, s in zip(iou, same, strict=True)]
    g = _first_max(other)
    if other[g] >= foreground:
        return "classification", g
    if max(v if u else 0.0 for v, u in zip(own, used, strict=True)) >= foreground:
        return "duplicate", None
    if max(iou) <= background:
        return "background", None
    return "both", None


def _first_max(values: list[float]) -> int:
    """The index of the first of the largest values (numpy's argmax)."""
    return values.index(max(values))
