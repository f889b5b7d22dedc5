"""VOC AP with the devkit's overlap: golden values by hand from the devkit's formula, and an
independent transcription of the devkit's MATLAB code (`VOCevaldet.m`, `VOCap.m`) as reference."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import SHARED_VOC

from pipeline_lib.measures.metrics import (
    ELEVEN_POINTS,
    OVERLAP_OF_SOURCE,
    SIZE_RANGES,
    ClassAP,
    all_point_ap,
    ap_by_size,
    box_overlap,
    confusion_matrix,
    detection_confusion,
    eleven_point_ap,
    match_image,
    mean_ap,
    multi_object_batch_sums,
    voc_average_precision,
    voc_box_iou,
)


def image(det_boxes, det_scores, gt_boxes, gt_difficult=None, det_labels=None, gt_labels=None):
    """One image's (detections, ground truth), all of class 0 unless labels are given."""
    det_labels = det_labels or [0] * len(det_boxes)
    gt_labels = gt_labels or [0] * len(gt_boxes)
    gt_difficult = gt_difficult or [False] * len(gt_boxes)
    return (
        (
            torch.tensor(det_boxes, dtype=torch.float64).reshape(-1, 4),
            torch.tensor(det_scores, dtype=torch.float64),
            torch.tensor(det_labels),
        ),
        (
            torch.tensor(gt_boxes, dtype=torch.float64).reshape(-1, 4),
            torch.tensor(gt_labels),
            torch.tensor(gt_difficult),
        ),
    )


def ap_of(images, overlap="voc_inclusive_pixels", n_classes=1, threshold=0.5):
    dets, gts = zip(*images, strict=True)
    return voc_average_precision(list(dets), list(gts), n_classes, threshold, overlap)


# --- the overlap itself, by hand from the devkit's formula ------------------------------------


@pytest.mark.parametrize(
    ("box", "devkit", "continuous"),
    [
        # truth (1, 1, 10, 10): 10 x 10 pixels under the devkit, 9 x 9 continuous
        ((1, 1, 10, 5), 50 / 100, 36 / 81),  # the example: exactly 0.5 under the devkit
        ((1, 1, 10, 10), 1.0, 1.0),
        ((6, 1, 15, 10), 50 / 150, 36 / 126),  # 5 x 10 common pixels of 10 x 10 boxes
        ((10, 1, 19, 10), 10 / 190, 0.0),  # one shared column; continuous: they only touch
        ((11, 1, 20, 10), 0.0, 0.0),  # side by side: no common pixel
        ((3, 3, 3, 3), 1 / 100, 0.0),  # a one-pixel box inside the truth
    ],
)
def test_devkit_overlap_by_hand(box, devkit, continuous):
    truth = torch.tensor([[1.0, 1, 10, 10]], dtype=torch.float64)
    det = torch.tensor([box], dtype=torch.float64)
    assert voc_box_iou(det, truth).item() == devkit  # exact: the devkit's operations
    assert box_overlap(det, truth, "continuous").item() == pytest.approx(continuous, abs=1e-15)
    assert box_overlap(det, truth, "voc_inclusive_pixels").item() == devkit


def test_unknown_overlap_is_refused():
    with pytest.raises(ValueError, match="overlap must be one of"):
        ap_of([image([[1, 1, 10, 10]], [0.9], [[1, 1, 10, 10]])], overlap="pixels")
    with pytest.raises(ValueError, match="overlap must be one of"):
        box_overlap(torch.zeros(1, 4), torch.zeros(1, 4), "inclusive")


def test_each_source_has_its_convention():
    assert OVERLAP_OF_SOURCE == {
        "voc": "voc_inclusive_pixels",  # 1-based pixel indices, xmax inclusive (VOC XML)
        "synthetic": "voc_inclusive_pixels",  # written as VOC XML by synthetic.py
        "coco": "continuous",  # COCO's [x, y, w, h] floats
    }


# --- AP with the devkit overlap, by hand -------------------------------------------------------


def test_a_detection_at_exactly_half_is_a_hit_under_the_devkit_only():
    images = [image([[1, 1, 10, 5]], [0.9], [[1, 1, 10, 10]])]
    [devkit] = ap_of(images)
    [continuous] = ap_of(images, overlap="continuous")
    assert devkit.ap == 1.0 and devkit.ap11 == 1.0  # 0.5 >= 0.5
    assert continuous.ap == 0.0 and continuous.ap11 == 0.0  # 0.444 < 0.5


def test_a_few_boxes_by_hand_under_both_overlaps():
    # Image A: truth g1 (1, 1, 10, 10). Image B: truth g2 (11, 11, 20, 20), and a difficult g3.
    # d1 0.9 on A (1, 1, 10, 5): devkit 0.5 -> TP; continuous 0.444 -> FP
    # d2 0.8 on B (11, 11, 20, 20): TP under both
    # d3 0.7 on A (1, 1, 10, 10): devkit: g1 taken -> FP; continuous: g1 still free -> TP
    # d4 0.6 on B (13, 11, 20, 20): overlap with g2 0.8 (devkit) / 63/81 (continuous), g2 taken
    #    -> FP under both
    # d5 0.5 on B (31, 31, 40, 40): exactly the difficult g3 -> ignored under both
    images = [
        image([[1, 1, 10, 5], [1, 1, 10, 10]], [0.9, 0.7], [[1, 1, 10, 10]]),
        image(
            [[11, 11, 20, 20], [13, 11, 20, 20], [31, 31, 40, 40]],
            [0.8, 0.6, 0.5],
            [[11, 11, 20, 20], [31, 31, 40, 40]],
            [False, True],
        ),
    ]
    # devkit: TP TP FP FP over 2 positives: recall .5 1 1 1, precision 1 1 2/3 1/2
    # all-point: .5 * 1 + .5 * 1 = 1; 11-point: 1 at every t
    [c] = ap_of(images)
    assert c.positives == 2 and c.detections == 4
    assert c.recall == pytest.approx([0.5, 1, 1, 1]) and c.precision == [1, 1, 2 / 3, 0.5]
    assert c.ap == 1.0 and c.ap11 == pytest.approx(1.0)
    # continuous: FP TP TP FP: recall 0 .5 1 1, precision 0 1/2 2/3 1/2
    # all-point: envelope 2/3 over recall 0..1 -> 2/3; 11-point: 2/3 at every t -> 2/3
    [c] = ap_of(images, overlap="continuous")
    assert c.precision == pytest.approx([0, 0.5, 2 / 3, 0.5])
    assert c.ap == pytest.approx(2 / 3) and c.ap11 == pytest.approx(2 / 3)


def test_a_detection_takes_the_first_of_two_equally_overlapped_objects():
    # d1 overlaps g1 and g2 equally (devkit: 50/150 each, below 0.5 at 0.5, a hit at 0.3): it
    # takes g1, the first; d2 then overlaps g1 best (1.0), which is taken -> FP, although g2 is
    # free: the devkit looks at the best-overlapping object only.
    images = [
        image([[6, 1, 15, 10], [1, 1, 10, 10]], [0.9, 0.8], [[1, 1, 10, 10], [11, 1, 20, 10]])
    ]
    [c] = ap_of(images, threshold=0.3)
    # TP FP over 2 positives: recall .5 .5, precision 1 .5 -> all-point .5; 11-point 6/11
    assert c.precision == [1.0, 0.5] and c.recall == [0.5, 0.5]
    assert c.ap == 0.5 and c.ap11 == pytest.approx(6 / 11)


def test_a_match_with_a_difficult_object_at_exactly_the_threshold_is_ignored():
    images = [
        image(
            [[1, 1, 10, 5], [41, 41, 50, 50]],
            [0.9, 0.8],
            [[1, 1, 10, 10], [41, 41, 50, 50]],
            [True, False],
        )
    ]
    [c] = ap_of(images)  # d1 on the difficult object at 0.5: neither TP nor FP
    assert c.detections == 1 and c.positives == 1 and c.ap == 1.0
    [c] = ap_of(images, overlap="continuous")  # 0.444: a plain false positive, ranked first
    assert c.detections == 2 and c.precision == [0.0, 0.5] and c.ap == 0.5


def matlab_colon(a: float, d: float, b: float) -> list[float]:
    """MATLAB's `a:d:b` for a range that ends on b: built from both ends, a + k*d up to the middle
    and b - (n - k)*d after it (MathWorks' colon algorithm; FreeMat documents the same)."""
    n = round((b - a) / d)
    return [a + k * d if k <= n // 2 else b - (n - k) * d for k in range(n + 1)]


def test_the_eleven_points_are_the_devkits_in_double_precision():
    # MATLAB's 0:0.1:1: 3 * 0.1 and 1 - 0.4, 1 - 3 * 0.1 (the doubles nearest 0.6 and 0.7)
    points = matlab_colon(0.0, 0.1, 1.0)
    assert points[3] == 0.30000000000000004 and points[6] == 0.6 and points[7] == 0.7
    assert list(ELEVEN_POINTS) == points


def test_a_recall_of_exactly_three_tenths_misses_the_devkits_fourth_point():
    # 10 objects, 3 found first then one false positive: recall reaches 3/10 in double, which is
    # below the devkit's 0.30000000000000004: precision 1 counts at 0, 0.1 and 0.2 only.
    recall = torch.tensor([1, 2, 3, 3], dtype=torch.float64) / 10
    precision = torch.tensor([1.0, 1.0, 1.0, 0.75], dtype=torch.float64)
    assert eleven_point_ap(recall, precision) == pytest.approx(3 / 11)
    # six of ten found, then a miss: 6/10 reaches the devkit's 0.6 (np.arange's would not)
    recall = torch.tensor([1, 2, 3, 4, 5, 6, 6], dtype=torch.float64) / 10
    precision = torch.tensor([1.0] * 6 + [6 / 7], dtype=torch.float64)
    assert eleven_point_ap(recall, precision) == pytest.approx(7 / 11)


# --- against the devkit's code, transcribed -------------------------------------------------


def _nanmax(values):
    """MATLAB's max: NaN ignored, empty -> empty."""
    kept = [v for v in values if not math.isnan(v)]
    return max(kept) if kept else None


def devkit_ap(detections, ground_truth, cls, minoverlap=0.5):
    """VOCevaldet.m and VOCap.m (VOC2012 devkit) for class `cls`, statement by statement.

    Written from the MATLAB source, independently of pipeline_lib: loops, no torch. Returns
    (all-point AP, 11-point AP) or None when the class has no non-difficult object.
    """
    gt, npos = [], 0
    for boxes, labels, difficult in ground_truth:
        mine = [j for j, k in enumerate(labels.tolist()) if k == cls]
        diff = [bool(difficult[j]) for j in mine]
        gt.append(
            {"BB": [boxes[j].tolist() for j in mine], "diff": diff, "det": [False] * len(mine)}
        )
        npos += sum(not d for d in diff)
    ids, confidence, bbs = [], [], []
    for i, (boxes, scores, labels) in enumerate(detections):  # the results file, image by image
        for b, s, k in zip(boxes.tolist(), scores.tolist(), labels.tolist(), strict=True):
            if k == cls:
                ids.append(i), confidence.append(s), bbs.append(b)
    si = sorted(range(len(confidence)), key=lambda j: -confidence[j])  # [sc,si]=sort(-confidence)
    nd = len(si)
    tp, fp = [0] * nd, [0] * nd
    for d in range(nd):
        i, bb = ids[si[d]], bbs[si[d]]
        ovmax, jmax = -math.inf, None
        for j, bbgt in enumerate(gt[i]["BB"]):
            bi = [
                max(bb[0], bbgt[0]),
                max(bb[1], bbgt[1]),
                min(bb[2], bbgt[2]),
                min(bb[3], bbgt[3]),
            ]
            iw = bi[2] - bi[0] + 1
            ih = bi[3] - bi[1] + 1
            if iw > 0 and ih > 0:
                ua = (
                    (bb[2] - bb[0] + 1) * (bb[3] - bb[1] + 1)
                    + (bbgt[2] - bbgt[0] + 1) * (bbgt[3] - bbgt[1] + 1)
                    - iw * ih
                )
                ov = iw * ih / ua
                if ov > ovmax:
                    ovmax, jmax = ov, j
        if ovmax >= minoverlap:
            if gt[i]["diff"][jmax]:
                pass  # difficult: neither tp nor fp
            elif not gt[i]["det"][jmax]:
                tp[d] = 1
                gt[i]["det"][jmax] = True
            else:
                fp[d] = 1  # multiple detection
        else:
            fp[d] = 1
    if npos == 0:
        return None
    ctp = [sum(tp[: d + 1]) for d in range(nd)]
    cfp = [sum(fp[: d + 1]) for d in range(nd)]
    rec = [t / npos for t in ctp]
    prec = [t / (t + f) if t + f else math.nan for t, f in zip(ctp, cfp, strict=True)]  # 0/0
    mrec, mpre = [0.0, *rec, 1.0], [0.0, *prec, 0.0]
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = _nanmax([mpre[i], mpre[i + 1]])
    changed = [i + 1 for i in range(len(mrec) - 1) if mrec[i + 1] != mrec[i]]
    ap = sum((mrec[i] - mrec[i - 1]) * mpre[i] for i in changed)
    ap11 = 0.0
    for t in matlab_colon(0.0, 0.1, 1.0):  # the devkit's 0:0.1:1
        p = _nanmax([p for p, r in zip(prec, rec, strict=True) if r >= t])
        ap11 += (0.0 if p is None else p) / 11
    return ap, ap11


def jittered(truth, n_classes, seed, integer):
    """Detections around the true boxes (some near an overlap of 0.5), plus noise boxes."""
    g = torch.Generator().manual_seed(seed)
    detections = []
    for boxes, labels, _ in truth:
        n = len(boxes)
        size = (boxes[:, 2:] - boxes[:, :2] + 1).repeat(1, 2)
        shift = (torch.rand(n, 4, generator=g, dtype=torch.float64) - 0.5) * 0.6 * size
        det = boxes + shift
        xy = torch.rand(2, 2, generator=g, dtype=torch.float64) * 300 + 1
        noise = torch.cat([xy, xy + 30], dim=1)
        det = torch.cat([det, det[: n // 2] + 2, noise])  # some duplicates too
        if integer:
            det = det.round()
        det[:, 2:] = torch.maximum(det[:, 2:], det[:, :2])
        scores = torch.rand(len(det), generator=g, dtype=torch.float64).round(decimals=1)  # ties
        det_labels = torch.cat(
            [labels, labels[: n // 2], torch.randint(0, n_classes, (2,), generator=g)]
        )
        detections.append((det, scores, det_labels))
    return detections


def random_truth(seed, n_images=40, n_classes=4):
    g = torch.Generator().manual_seed(seed)
    truth = []
    for _ in range(n_images):
        n = int(torch.randint(1, 6, (1,), generator=g))
        xy = torch.randint(1, 300, (n, 2), generator=g).double()
        wh = torch.randint(3, 120, (n, 2), generator=g).double()
        labels = torch.randint(0, n_classes, (n,), generator=g)
        truth.append((torch.cat([xy, xy + wh], dim=1), labels, torch.rand(n, generator=g) < 0.15))
    return truth


def voc_val_truth():
    if not (SHARED_VOC / "Annotations").is_dir():
        pytest.skip(f"genuine VOC2007 subset not found at {SHARED_VOC} (it ships beside the repo)")
    from pipeline_lib.data.voc import VOC_CLASSES, read_voc
    from pipeline_lib.models.targets import ground_truth

    rows = read_voc(SHARED_VOC, {"val": "val"}, VOC_CLASSES, progress=False)
    import pandas as pd

    objects = pd.DataFrame(rows.objects)
    return ground_truth(objects, [r["image_id"] for r in rows.images]), len(VOC_CLASSES)


@pytest.mark.parametrize(("data", "integer"), [("random", True), ("random", False), ("voc", True)])
def test_equals_the_devkit_code(data, integer):
    truth, n_classes = voc_val_truth() if data == "voc" else (random_truth(7), 4)
    detections = jittered(truth, n_classes, seed=3, integer=integer)
    ours = voc_average_precision(detections, truth, n_classes, 0.5, "voc_inclusive_pixels")
    continuous = voc_average_precision(detections, truth, n_classes, 0.5, "continuous")
    moved = 0
    for k in range(n_classes):
        reference = devkit_ap(detections, truth, k)
        if reference is None:
            assert ours[k].ap is None
            continue
        assert ours[k].ap == pytest.approx(reference[0], abs=1e-12)
        assert ours[k].ap11 == pytest.approx(reference[1], abs=1e-12)
        moved += abs(continuous[k].ap - reference[0]) > 1e-3
    assert moved >= 1  # the continuous IoU is not the devkit's number on these detections
    assert mean_ap(ours) > 0.2


# --- training-curve measures and the COCO second opinion, by hand ------------------------------


def grid_batch():
    """One image, 3 x 3 cells, 2 classes: objects in cells (0, 0) (class 0), (1, 1) (class 1) and
    (2, 0) (class 1).

    Boxes are (cx, cy, w, h): centres in cell units, sizes in image fractions."""
    pred = torch.zeros(1, 4, 3, 3)
    true = torch.zeros(1, 4, 3, 3)
    pred[0, :, 0, 0] = true[0, :, 0, 0] = torch.tensor([0.5, 0.5, 0.3, 0.3])  # IoU 1
    # centres 0.3 cell apart = 0.1 of the image: x [0, 0.3] vs [0.1, 0.4], y both [0, 0.3]:
    # intersection 0.2 * 0.3, union 0.09 + 0.09 - 0.06 -> IoU 0.5
    pred[0, :, 1, 1] = torch.tensor([0.45, 0.45, 0.3, 0.3])
    true[0, :, 1, 1] = torch.tensor([0.75, 0.45, 0.3, 0.3])
    # same centre, width 0.2 vs 0.4 at equal height -> IoU 0.5
    pred[0, :, 2, 0] = torch.tensor([0.5, 0.5, 0.2, 0.3])
    true[0, :, 2, 0] = torch.tensor([0.5, 0.5, 0.4, 0.3])
    has_obj = torch.zeros(1, 3, 3)
    has_obj[0, 0, 0] = has_obj[0, 1, 1] = has_obj[0, 2, 0] = 1.0
    labels = torch.zeros(1, 3, 3, dtype=torch.long)
    labels[0, 1, 1] = labels[0, 2, 0] = 1
    logits = torch.zeros(1, 3, 3, 3)
    logits[0, 1] = 1.0  # class 1 everywhere ...
    logits[0, 0, 0, 0] = 2.0  # ... but class 0 in (0, 0): right in (0, 0) and (1, 1)
    logits[0, 0, 2, 0] = 3.0  # class 0 in (2, 0): wrong there
    logits[0, 2] = torch.tensor([[2.0, -3.0, -1.0], [0.0, 0.5, -2.0], [-1.0, -4.0, 0.0]])
    return (pred, logits), (true, has_obj, labels)


def test_grid_measures_by_hand():
    outputs, targets = grid_batch()
    sums = multi_object_batch_sums(outputs, targets)
    assert sums["accuracy"] == (2.0, 3)  # over the object cells only
    assert sums["iou"][1] == 3 and sums["iou"][0] == pytest.approx(2.0)
    # logit > 0 means "object": objects at (0,0) 2 yes, (1,1) 0.5 yes, (2,0) -1 no; empty cells
    # all <= 0, (1,0) and (2,2) exactly 0 -> no: 8 of 9 right
    assert sums["obj_accuracy"] == (8.0, 9)


def test_grid_measures_of_two_levels_and_of_anchors_add_up():
    outputs, targets = grid_batch()
    both = multi_object_batch_sums(outputs + outputs, targets + targets)  # a two-level head
    assert both["accuracy"] == (4.0, 6) and both["obj_accuracy"] == (16.0, 18)
    assert both["iou"][0] == pytest.approx(4.0)
    # two anchors per cell, the second slot empty: (B, A, ...) shapes
    (pred, logits), (true, has_obj, labels) = outputs, targets
    empty_logits = torch.full_like(logits, -5.0)
    anchored = multi_object_batch_sums(
        (torch.stack([pred, pred], 1), torch.stack([logits, empty_logits], 1)),
        (
            torch.stack([true, true], 1),
            torch.stack([has_obj, 0 * has_obj], 1),
            torch.stack([labels, labels], 1),
        ),
    )
    assert anchored["accuracy"] == (2.0, 3) and anchored["obj_accuracy"] == (17.0, 18)
    assert anchored["iou"][0] == pytest.approx(2.0)


def test_scores_are_ranked_at_full_precision_and_lists_must_pair_up():
    # a false positive of a later image scoring 1e-9 above a true positive ranks first (float32
    # would tie them and keep the image order)
    images = [
        image([[1, 1, 10, 10]], [0.5], [[1, 1, 10, 10]]),
        image([[50, 50, 60, 60]], [0.5 + 1e-9], [[1, 1, 10, 10]]),
    ]
    [c] = ap_of(images)
    assert c.precision == [0.0, 0.5] and c.recall == [0.0, 0.5]
    dets, gts = zip(*images, strict=True)
    with pytest.raises(ValueError):  # two images' detections, four images' truth
        voc_average_precision(list(dets), list(gts) * 2, 1)


def test_a_class_without_objects_and_the_means():
    detected_only = image([[1, 1, 10, 10]], [0.9], [[1, 1, 10, 10]], det_labels=[1], gt_labels=[0])
    missed, unknown = ap_of([detected_only], n_classes=2)
    assert missed == ClassAP(0.0, 0.0, [], [], 1, 0)  # an object never detected
    assert unknown == ClassAP(None, None, [], [], 0, 1)  # detections of a class without objects
    # all-point and 11-point differ here (5/9 and 6/11): the mean takes the one asked for
    per_class = [
        ClassAP(5 / 9, 6 / 11, [], [], 3, 3),
        ClassAP(None, None, [], [], 0, 2),
        ClassAP(1.0, 1.0, [], [], 1, 1),
    ]
    assert mean_ap(per_class) == pytest.approx((5 / 9 + 1) / 2)
    assert mean_ap(per_class, eleven_point=True) == pytest.approx((6 / 11 + 1) / 2)
    assert mean_ap([]) == 0.0 and mean_ap([ClassAP(None, None, [], [], 0, 4)]) == 0.0


def test_confusion_matrix_keeps_classes_never_seen():
    matrix = confusion_matrix(torch.tensor([0, 1, 1]), torch.tensor([1, 1, 0]), 4)
    assert matrix.tolist() == [[0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]


def one_image(det_boxes, det_scores, det_labels, gt_boxes, gt_labels, gt_difficult=None):
    gt_difficult = gt_difficult or [False] * len(gt_labels)
    return (
        (
            torch.tensor(det_boxes, dtype=torch.float64).reshape(-1, 4),
            torch.tensor(det_scores),
            torch.tensor(det_labels, dtype=torch.long),
        ),
        (
            torch.tensor(gt_boxes, dtype=torch.float64).reshape(-1, 4),
            torch.tensor(gt_labels, dtype=torch.long),
            torch.tensor(gt_difficult),
        ),
    )


A, B, C, FAR = [0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50], [100, 100, 110, 110]


def ap_of_images(images, n_classes=1):
    dets, gts = zip(*images, strict=True)
    return voc_average_precision(list(dets), list(gts), n_classes)


def test_perfect_detections_give_ap_one():
    [c] = ap_of_images([one_image([A, B], [0.9, 0.8], [0, 0], [A, B], [0, 0])])
    assert c.ap == 1.0 and c.ap11 == 1.0


def test_false_positive_ranked_first():
    # ranked FP, TP, TP over 2 objects: recall 0, .5, 1; precision 0, .5, 2/3
    # all-point: envelope 2/3 over recall 0..1 -> 2/3; 11-point: 2/3 at every t -> 2/3
    [c] = ap_of_images([one_image([FAR, A, B], [0.9, 0.8, 0.7], [0, 0, 0], [A, B], [0, 0])])
    assert c.ap == pytest.approx(2 / 3) and c.ap11 == pytest.approx(2 / 3)
    assert c.precision == pytest.approx([0, 0.5, 2 / 3])


def test_eleven_point_and_all_point_differ_by_hand():
    # 3 objects, ranked TP, FP, TP: recall 1/3, 1/3, 2/3; precision 1, 1/2, 2/3
    # all-point: 1/3 * 1 + 1/3 * 2/3 + 1/3 * 0 = 5/9
    # 11-point: t = 0, .1, .2, .3 -> 1; t = .4, .5, .6 -> 2/3; t = .7 ... 1 -> 0: 6/11
    [c] = ap_of_images([one_image([A, FAR, B], [0.9, 0.8, 0.7], [0, 0, 0], [A, B, C], [0, 0, 0])])
    assert c.ap == pytest.approx(5 / 9) and c.ap11 == pytest.approx(6 / 11)
    recall, precision = torch.tensor([1 / 3, 1 / 3, 2 / 3]), torch.tensor([1, 0.5, 2 / 3])
    assert all_point_ap(recall, precision) == pytest.approx(5 / 9)


def test_difficult_objects_are_neither_true_nor_false_positives():
    images = [
        one_image([A], [0.9], [0], [A], [0]),
        one_image([B], [0.95], [0], [B], [0], [True]),  # detecting a difficult object: ignored
    ]
    [c] = ap_of_images(images)
    assert c.ap == 1.0 and c.positives == 1 and c.detections == 1


def test_duplicates_give_one_true_positive_then_false_positives():
    shifted = [1, 0, 11, 10]
    [c] = ap_of_images([one_image([A, shifted, A], [0.9, 0.8, 0.7], [0, 0, 0], [A, B], [0, 0])])
    assert c.precision == pytest.approx([1, 0.5, 1 / 3]) and c.recall == pytest.approx([0.5] * 3)
    assert c.ap == pytest.approx(0.5)


def test_class_absent_from_ground_truth_is_left_out_of_the_mean():
    per_class = ap_of_images([one_image([A, B], [0.9, 0.8], [0, 1], [A], [0])], n_classes=2)
    assert per_class[0].ap == 1.0 and per_class[1].ap is None and per_class[1].detections == 1
    assert mean_ap(per_class) == 1.0


def test_agrees_with_torchmetrics_on_random_detections():
    from torchmetrics.detection import MeanAveragePrecision

    g = torch.Generator().manual_seed(0)
    images, preds, targets = [], [], []
    for _ in range(20):
        n_gt = int(torch.randint(1, 5, (1,), generator=g))
        xy = torch.rand(n_gt, 2, generator=g) * 200
        gt = torch.cat([xy, xy + 20 + torch.rand(n_gt, 2, generator=g) * 80], dim=1)
        gt_labels = torch.randint(0, 3, (n_gt,), generator=g)
        jitter = (torch.rand(n_gt, 4, generator=g) - 0.5) * 30
        noise_xy = torch.rand(3, 2, generator=g) * 200
        noise = torch.cat([noise_xy, noise_xy + 40], dim=1)
        det = torch.cat([gt + jitter, noise])
        scores = torch.rand(len(det), generator=g)
        det_labels = torch.cat([gt_labels, torch.randint(0, 3, (3,), generator=g)])
        images.append(
            ((det, scores, det_labels), (gt, gt_labels, torch.zeros(n_gt, dtype=torch.bool)))
        )
        preds.append({"boxes": det.float(), "scores": scores.float(), "labels": det_labels})
        targets.append({"boxes": gt.float(), "labels": gt_labels})
    ours = mean_ap(ap_of_images(images, n_classes=3))
    metric = MeanAveragePrecision(iou_thresholds=[0.5], backend="faster_coco_eval")
    metric.update(preds, targets)
    theirs = float(metric.compute()["map_50"])
    assert 0.2 < ours < 0.95
    assert ours == pytest.approx(theirs, abs=0.02)  # COCO interpolates at 101 recall points


def test_ap_by_size_by_hand():
    """COCO's rule per size: objects of other sizes are ignored like difficult ones, detections
    of other sizes that match nothing are ignored. One image: a large object L (100 x 100) and a
    small one S (20 x 20), both found (0.9, 0.8), a small false positive (0.85) and a large one
    (0.95)."""
    large, small = [0, 0, 100, 100], [200, 200, 220, 220]
    small_fp, large_fp = [300, 300, 320, 320], [400, 400, 500, 500]
    detections = [large, small, small_fp, large_fp]
    dets, truth = one_image(detections, [0.9, 0.8, 0.85, 0.95], [0] * 4, [large, small], [0, 0])
    found = ap_by_size([dets], [truth], 1)
    # small: ranked large_fp (ignored), L-hit (an ignored object: neither), small_fp (FP), S (TP)
    # -> precision 0, 1/2 at recall 0, 1 -> AP 1/2
    assert found["small"][0].ap == pytest.approx(0.5) and found["small"][0].positives == 1
    # large: large_fp (FP), L (TP); the small ones ignored -> AP 1/2
    assert found["large"][0].ap == pytest.approx(0.5) and found["large"][0].detections == 2
    assert found["medium"][0].ap is None  # no medium object
    assert list(found) == list(SIZE_RANGES) == ["small", "medium", "large"]


def test_ap_by_size_boundaries_belong_to_the_larger_size():
    """Ranges are [low, high): a 32 x 32 box (area 32² exactly) is medium, a 96 x 96 one large,
    for the objects and for the detections alike. Objects M (32 x 32) and L (96 x 96), both
    found (0.9, 0.8), false positives of 32 x 32 (0.95) and of 96 x 96 (0.92)."""
    m, big = [0, 0, 32, 32], [100, 100, 196, 196]
    fp_m, fp_big = [300, 300, 332, 332], [400, 400, 496, 496]
    scores = [0.9, 0.8, 0.95, 0.92]
    dets, truth = one_image([m, big, fp_m, fp_big], scores, [0] * 4, [m, big], [0, 0])
    found = ap_by_size([dets], [truth], 1, overlap="continuous")
    assert found["small"][0].ap is None  # no small object
    # medium: fp_m (FP), fp_big (another size: ignored), M (TP); L's hit counts as neither
    assert found["medium"][0].positives == 1 and found["medium"][0].ap == pytest.approx(0.5)
    # large: fp_m and M's hit ignored, fp_big (FP), L (TP)
    assert found["large"][0].positives == 1 and found["large"][0].ap == pytest.approx(0.5)


# --- one image's matching, and the confusion of a detector -------------------------------------


def test_match_image_by_hand():
    """Objects: cats A and B, a difficult cat D, a dog G. Detections in input order: a cat on B
    (0.5), a cat on A (0.9), another cat on A (0.8: A is taken), a cat on D (0.7: neither), a cat
    on G (0.6: no cat there), a dog on G (0.4). Outcomes in input order, with the object each
    took (the dog's is G; the cat on G overlaps no cat)."""
    a, b, d, g = [0, 0, 100, 100], [200, 0, 300, 100], [0, 200, 100, 300], [400, 0, 500, 100]
    (dets, truth) = image(
        [b, a, a, d, g, g],
        [0.5, 0.9, 0.8, 0.7, 0.6, 0.4],
        [a, b, d, g],
        [False, False, True, False],
        det_labels=[0, 0, 0, 0, 0, 1],
        gt_labels=[0, 0, 0, 1],
    )
    outcome, taken = match_image(dets, truth, 0.5, "continuous")
    assert outcome.tolist() == [1, 1, 0, -1, 0, 1]
    assert taken.tolist() == [1, 0, 0, 2, -1, 3]
    assert outcome.dtype == torch.int8


def test_detection_confusion_by_hand():
    """Classes cat, dog (+ background). Image 1: a cat found as a cat, a dog taken for a cat (IoU
    0.9), a dog nobody found. Image 2: a cat false positive far away, a detection on a difficult
    cat (counts for nothing). Pairs go by overlap whatever the class, each object and detection
    once: the better-overlapping of two detections of one cat wins."""
    cat, dog, dog2 = [0, 0, 100, 100], [200, 0, 300, 100], [400, 0, 500, 100]
    image1 = image(
        [cat, [0, 0, 100, 60], [200, 0, 300, 90]],
        [0.9, 0.95, 0.8],
        [cat, dog, dog2],
        det_labels=[0, 0, 0],
        gt_labels=[0, 1, 1],
    )
    image2 = image(
        [[600, 600, 700, 700], cat], [0.5, 0.6], [cat], [True], det_labels=[0, 1], gt_labels=[0]
    )
    dets, truth = zip(image1, image2, strict=True)
    matrix = detection_confusion(list(dets), list(truth), 2, 0.5, "continuous")
    # rows actual cat, dog, background; columns predicted cat, dog, background
    assert matrix.tolist() == [
        [1, 0, 0],  # the cat: found by the exact box; the 0.6-IoU one is left ...
        [1, 0, 1],  # a dog taken for a cat; the other dog missed
        [2, 0, 0],  # ... as a false cat, and so is the far one; the dog on a difficult: nothing
    ]
