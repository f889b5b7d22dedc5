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

import bisect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pipeline_lib.measures.metrics import (
    FALSE_POSITIVE,
    IGNORED,
    TRUE_POSITIVE,
    _class_ap,
    box_overlap,
    match_image,
    mean_ap,
    precision_envelope,
)

ERROR_TYPES = ("classification", "localisation", "both", "duplicate", "background", "missed")
BACKGROUND_IOU = 0.1  # TIDE's: below this overlap with every object, a detection is background
MAX_DETECTIONS = 100  # TIDE's max_dets: an image's detections beyond its 100 best count for nothing
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


@dataclass
class ClassRanking:
    """One class's AP entries: each detection's score and whether it found an object, and the
    number of objects to find."""

    objects: int
    scores: list[float] = field(default_factory=list)
    hits: list[bool] = field(default_factory=list)

    def add(self, score: float, hit: bool) -> None:
        self.scores.append(score)
        self.hits.append(hit)


@dataclass(frozen=True)
class Scoring:
    """How detections become true and false positives, and how their AP is averaged.

    `match(detections, truth, foreground, overlap)`: one image's (outcome (D,) integer as
    metrics.match_image's: TRUE_POSITIVE, FALSE_POSITIVE or IGNORED for a detection that counts
    for nothing; object (D,) int64: the index in `truth` of the object taken, else -1);
    `mean_ap(classes)`: one ClassRanking per class -> the mean AP."""

    name: str
    match: Callable[[Pair, Pair, float, str], tuple[torch.Tensor, torch.Tensor]]
    mean_ap: Callable[[list[ClassRanking]], float]


def _by_score(scores: list[float]) -> list[int]:
    """The indices of `scores` from the highest score down, equal scores in input order."""
    # Python's sort is stable (reverse=True too), as the devkit's and TIDE's rankings; a plain
    # list, as every caller reads its detections one by one.
    return sorted(range(len(scores)), key=scores.__getitem__, reverse=True)


def _devkit_mean(classes: list[ClassRanking]) -> float:
    return mean_ap([_class_ap(c.scores, c.hits, c.objects) for c in classes])


def _tide_match(detections: Pair, truth: Pair, foreground: float, overlap: str):
    """TIDE's matching (quantify.py's TIDEExample): over the image's MAX_DETECTIONS best
    detections in score order, each takes the object of its class not taken yet that it overlaps
    most (the first of equal maxima) from `foreground` on; the other detections count for
    nothing."""
    boxes, scores, labels = detections
    g_boxes, g_labels, _ = truth
    outcome = torch.full((len(scores),), IGNORED)
    taken_by = torch.full((len(scores),), -1)
    iou = box_overlap(boxes.double(), g_boxes.double(), overlap)
    iou = iou * (labels[:, None] == g_labels[None, :])
    for d in _by_score(scores.tolist())[:MAX_DETECTIONS]:
        outcome[d] = FALSE_POSITIVE
        if len(g_boxes) and iou[d].max() >= foreground:
            g = int(iou[d].argmax())
            outcome[d], taken_by[d] = TRUE_POSITIVE, g
            iou[:, g] = 0
    return outcome, taken_by


def _tide_mean(classes: list[ClassRanking]) -> float:
    """tidecv's ap.py: per class, precision made non-increasing, read at the first rank reaching
    each recall k / 100 (0 where none does), averaged (0 for a class without objects); the mean
    over the classes with objects or detections."""
    aps = []
    for c in classes:
        if not c.scores and not c.objects:
            continue
        curve = _class_ap(c.scores, c.hits, c.objects)  # no ranks for a class without objects
        precision = torch.tensor(curve.precision, dtype=torch.float64)
        envelope = precision_envelope(precision).tolist()
        ranks = [bisect.bisect_left(curve.recall, k / 100) for k in range(101)]
        values = [envelope[i] if i < len(envelope) else 0.0 for i in ranks]
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
class _Entry:
    """A detection's AP entry: a true positive (kind None) or an error of one of ERROR_TYPES."""

    kind: str | None
    label: int  # the class it is ranked in as it is
    score: float
    fixed_label: int | None = None  # the class it finds once fixed: set on the best-scored fix
    # of each object, None for the others (a fix that finds nothing is dropped)


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
    entries: list[_Entry] = []  # per image, in score order
    positives, missed = [0] * n_classes, [0] * n_classes  # objects per class, and those missed
    for dets, objs in zip(detections, truth, strict=True):
        boxes, scores, labels = dets
        outcome, taken = scoring.match(dets, objs, foreground, overlap)
        keep = ~objs[2].bool()  # difficult objects are TIDE's ignore regions
        g_boxes, g_labels = objs[0][keep], objs[1][keep]
        found = torch.zeros_like(keep)
        found[taken[outcome == TRUE_POSITIVE]] = True
        found = found[keep]
        iou = box_overlap(boxes.double(), g_boxes.double(), overlap)
        same = labels[:, None] == g_labels[None, :]
        types = _error_types(iou, same, found, foreground, background)
        reached = found.tolist()  # found by a detection, or by the fix of one
        objects, outcomes, classes = g_labels.tolist(), outcome.tolist(), labels.tolist()
        values = scores.tolist()
        for d in _by_score(values):
            if outcomes[d] == TRUE_POSITIVE:
                entries.append(_Entry(None, classes[d], values[d]))
            elif outcomes[d] != IGNORED:  # IGNORED: it matched a difficult object
                kind, g = types[d]
                entries.append(_Entry(kind, classes[d], values[d]))
                if g is not None and not reached[g]:  # the first fix to find g, the best-scored
                    entries[-1].fixed_label, reached[g] = objects[g], True
        for g, k in enumerate(objects):
            positives[k] += 1
            missed[k] += not reached[g]

    def fixed_map(kind: str | None) -> float:
        ranked = [
            ClassRanking(positives[k] - (missed[k] if kind == "missed" else 0))
            for k in range(n_classes)
        ]
        for entry in entries:
            if entry.kind is None:  # a true positive
                ranked[entry.label].add(entry.score, True)
            elif entry.kind != kind:
                ranked[entry.label].add(entry.score, False)
            elif entry.fixed_label is not None:  # the others of this kind are dropped
                ranked[entry.fixed_label].add(entry.score, True)
        return scoring.mean_ap(ranked)

    start = fixed_map(None)
    gains = {kind: max(fixed_map(kind) - start, 0.0) for kind in ERROR_TYPES}
    counts = {kind: sum(entry.kind == kind for entry in entries) for kind in ERROR_TYPES}
    counts["missed"] = sum(missed)  # missed objects have no entry
    return ErrorSplit(start, gains, counts)


def _error_types(
    iou: torch.Tensor,
    same: torch.Tensor,
    found: torch.Tensor,
    foreground: float,
    background: float,
) -> list[tuple[str, int | None]]:
    """TIDE's tests, in its order, of each detection as one that found nothing: (its error type,
    the object a localisation or classification fix would find, else None). iou (D, G): each
    detection's overlap with each of the image's objects; same (D, G) bool: the object is of the
    detection's class; found (G,) bool: a detection found the object."""
    if not iou.shape[1]:  # no object: nothing overlaps
        return [("background", None)] * len(iou)
    own = iou * same
    own_best, own_object = (t.tolist() for t in own.max(1))  # the first of equal maxima
    other_best, other_object = (t.tolist() for t in (iou * ~same).max(1))
    found_best, any_best = (own * found).amax(1).tolist(), iou.amax(1).tolist()
    types: list[tuple[str, int | None]] = []
    for d in range(len(iou)):
        if background <= own_best[d] <= foreground:
            types.append(("localisation", own_object[d]))
        elif other_best[d] >= foreground:
            types.append(("classification", other_object[d]))
        elif found_best[d] >= foreground:
            types.append(("duplicate", None))
        elif any_best[d] <= background:
            types.append(("background", None))
        else:
            types.append(("both", None))
    return types
