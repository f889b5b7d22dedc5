"""TIDE's error split: one hand-made image per error type with the mAP each fix gives back,
computed by hand on the devkit's AP; and tidecv, TIDE's reference implementation, on the same
random detections: the same types counted and the same gains with TIDE's own AP."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
from test_metrics import image, random_truth

from pipeline_lib.measures.errortypes import DEVKIT, ERROR_TYPES, TIDE, split_errors
from pipeline_lib.measures.metrics import (
    FALSE_POSITIVE,
    IGNORED,
    TRUE_POSITIVE,
    mean_ap,
    voc_average_precision,
)

OBJECT = [0, 0, 100, 100]
CAT, DOG = 0, 1
FAR = [200, 200, 300, 300]  # overlaps no OBJECT


def one_image_per_type():
    """Continuous overlap; every object a cat at OBJECT. Detections (score):
    1. a cat at OBJECT (0.9): found;  a second one (0.8): duplicate;
    2. a dog at OBJECT (0.7): classification (another class's object at IoU 1);
    3. a cat at (0, 0, 100, 40) (0.6): localisation (IoU 0.4);
    4. a dog at (0, 0, 100, 30) (0.5): both (IoU 0.3 with a cat, no dog around); its cat missed;
    5. a cat far away (0.95): background; its cat missed;
    6. a cat at OBJECT (0.3): found."""
    return [
        image([OBJECT, OBJECT], [0.9, 0.8], [OBJECT], det_labels=[CAT, CAT]),
        image([OBJECT], [0.7], [OBJECT], det_labels=[DOG]),
        image([[0, 0, 100, 40]], [0.6], [OBJECT]),
        image([[0, 0, 100, 30]], [0.5], [OBJECT], det_labels=[DOG]),
        image([[500, 500, 600, 600]], [0.95], [OBJECT]),
        image([OBJECT], [0.3], [OBJECT]),
    ]


def split(images, scoring=DEVKIT, n_classes=2):
    dets, gts = zip(*images, strict=True)
    return split_errors(list(dets), list(gts), n_classes, scoring, "continuous")


def test_one_image_per_type_by_hand():
    """Cats ranked: bkg 0.95 (F), found 0.9 (T), dupe 0.8 (F), loc 0.6 (F), found 0.3 (T); 6
    cats to find; dogs have no object (left out of the mean). Start: precision 1/2 at recall
    1/6, 2/5 at 2/6 -> AP = (1/2 + 2/5) / 6 = 0.15. Each fix alone:
    - classification: the dog at 0.7 becomes a found cat: precisions 1/2, 2/4, 3/6 -> 0.25;
    - localisation: the cat at 0.6 found: 1/2, 2/4, 3/5, envelope 3/5 each -> 0.3;
    - both: the second dog dropped: no cat moves -> 0.15;
    - duplicate: 0.8 dropped: 1/2, 2/4 -> 1/6;
    - background: 0.95 dropped: 1, 2/4 -> 0.25;
    - missed: the two cats no fix can find stop counting: (1/2 + 2/5) / 4 = 0.225."""
    found = split(one_image_per_type())
    assert found.map == pytest.approx(0.15)
    assert found.counts == {
        "classification": 1,
        "localisation": 1,
        "both": 1,
        "duplicate": 1,
        "background": 1,
        "missed": 2,
    }
    gains = {"classification": 0.1, "localisation": 0.15, "both": 0.0}
    gains |= {"duplicate": 1 / 6 - 0.15, "background": 0.1, "missed": 0.075}
    assert found.gains == pytest.approx(gains)
    assert list(found.gains) == list(ERROR_TYPES)


def test_the_start_is_the_devkit_s_map():
    truth = random_truth(2)
    dets = [
        (
            b + 3,
            torch.rand(len(k), generator=torch.Generator().manual_seed(n), dtype=torch.float64),
            k,
        )
        for n, (b, k, _) in enumerate(truth)
    ]
    found = split_errors(dets, truth, 4, DEVKIT, "voc_inclusive_pixels")
    assert found.map == pytest.approx(mean_ap(voc_average_precision(dets, truth, 4)), abs=1e-12)


def test_one_fix_per_object_the_best_scored():
    """Two localisation errors on one cat (0.6 and 0.55) and one on a cat already found: fixing
    localisation finds the first cat once (the 0.6 one), drops the 0.55 and the third.
    Cats ranked: found 0.9, loc 0.7 (on the found cat), loc 0.6, loc 0.55: start 1 at recall 1/2
    -> AP 0.5; fixed: found 0.9, found 0.6 -> AP 1."""
    near, nearer = [0, 0, 100, 40], [0, 0, 100, 45]
    images = [
        image([OBJECT, nearer], [0.9, 0.7], [OBJECT]),
        image([near, nearer], [0.6, 0.55], [OBJECT]),
    ]
    found = split(images, n_classes=1)
    assert found.counts["localisation"] == 3 and found.counts["missed"] == 0
    assert found.map == pytest.approx(0.5)
    assert found.gains["localisation"] == pytest.approx(0.5)


def test_difficult_objects_are_ignore_regions():
    """A detection on a difficult cat counts for nothing (no error) and the difficult cat is
    never missed; a detection beside it is judged against the other objects only."""
    images = [
        image([OBJECT, [500, 500, 550, 550]], [0.9, 0.8], [OBJECT], gt_difficult=[True]),
        image([OBJECT], [0.7], [OBJECT]),
    ]
    found = split(images, n_classes=1)
    assert found.counts == dict.fromkeys(ERROR_TYPES, 0) | {"background": 1}
    assert found.map == pytest.approx(0.5)  # the background error (0.8) ranks before the find


@pytest.mark.parametrize("scoring", [DEVKIT, TIDE], ids=lambda s: s.name)
def test_each_scoring_s_matching_names_the_object_taken_or_minus_1(scoring):
    """Scoring.match's contract, read by the split. A dog at OBJECT and a cat at FAR; cats
    detected at FAR (0.7: finds object 1), at OBJECT (0.9: on the dog, another class) and far
    from both (0.8): TRUE_POSITIVE with its object, FALSE_POSITIVE with -1, in either scoring."""
    dets, truth = image(
        [FAR, OBJECT, [500, 500, 600, 600]],
        [0.7, 0.9, 0.8],
        [OBJECT, FAR],
        gt_labels=[DOG, CAT],
    )
    outcome, taken = scoring.match(dets, truth, 0.5, "continuous")
    assert outcome.tolist() == [TRUE_POSITIVE, FALSE_POSITIVE, FALSE_POSITIVE]
    assert taken.tolist() == [1, -1, -1]


def test_tide_s_matching_counts_an_image_s_100_best_detections_only():
    """TIDE's max_dets: the 101st detection by score (the lowest, first in the input) is
    IGNORED, and takes no object even where it covers one exactly."""
    dets, truth = image(
        [OBJECT] + [FAR] * 100, [0.01] + [0.9 - k / 1000 for k in range(100)], [OBJECT]
    )
    outcome, taken = TIDE.match(dets, truth, 0.5, "continuous")
    assert outcome.tolist() == [IGNORED] + [FALSE_POSITIVE] * 100
    assert taken.tolist() == [-1] * 101


def tidecv_split(detections, truth):
    """tidecv's own figures: (AP, {type: dAP}, {type: count}), in its percent."""
    from tidecv import TIDE as Reference
    from tidecv import Data

    gt, found = Data("truth"), Data("detections")
    for n, ((boxes, labels, _), (d_boxes, scores, d_labels)) in enumerate(
        zip(truth, detections, strict=True)
    ):
        gt.add_image(n, str(n))
        for (x0, y0, x1, y1), k in zip(boxes.tolist(), labels.tolist(), strict=True):
            gt.add_ground_truth(n, k, [x0, y0, x1 - x0, y1 - y0])
        for (x0, y0, x1, y1), s, k in zip(
            d_boxes.tolist(), scores.tolist(), d_labels.tolist(), strict=True
        ):
            found.add_detection(n, k, s, [x0, y0, x1 - x0, y1 - y0])
    tide = Reference()
    with contextlib.redirect_stdout(io.StringIO()):
        run = tide.evaluate(gt, found, mode=Reference.BOX, name="run")
        gains = tide.get_main_errors()["run"]
    counts = {kind.short_name: len(errors) for kind, errors in run.error_dict.items()}
    return run.ap, gains, counts


def assert_equals_tidecv(ours, detections, truth) -> None:
    """Our split (TIDE's scoring) has tidecv's counts, AP and gains (its percent) to 1e-9."""
    ap, gains, counts = tidecv_split(detections, truth)
    assert {kind: counts[SHORT[kind]] for kind in ERROR_TYPES} == ours.counts
    assert ours.map * 100 == pytest.approx(ap, abs=1e-9)
    for kind in ERROR_TYPES:
        assert ours.gains[kind] * 100 == pytest.approx(gains[SHORT[kind]], abs=1e-9), kind


SHORT = {
    "classification": "Cls",
    "localisation": "Loc",
    "both": "Both",
    "duplicate": "Dupe",
    "background": "Bkg",
    "missed": "Miss",
}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_tidecv_with_its_own_ap(seed):
    """Random cats and dogs, detections jittered around them (a fifth relabelled at random),
    duplicates and noise, distinct scores: every count, the AP (COCO's 101 points, TIDE's
    matching) and each type's dAP as tidecv (1.0.1) computes them."""
    g = torch.Generator().manual_seed(seed)
    truth = [
        (b.double(), k, torch.zeros(len(k), dtype=torch.bool)) for b, k, _ in random_truth(seed)
    ]
    detections = []
    for boxes, labels, _ in truth:
        n = len(boxes)
        size = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
        moved = boxes + (torch.rand(n, 4, generator=g, dtype=torch.float64) - 0.5) * 0.7 * size
        noise = torch.rand(2, 2, generator=g, dtype=torch.float64) * 300
        found = torch.cat([moved, moved[: n // 2] + 3, torch.cat([noise, noise + 40], 1)])
        found[:, 2:] = torch.maximum(found[:, 2:], found[:, :2] + 1)
        k = torch.cat([labels, labels[: n // 2], torch.randint(0, 4, (2,), generator=g)])
        relabel = torch.rand(len(k), generator=g) < 0.2
        k = torch.where(relabel, torch.randint(0, 4, (len(k),), generator=g), k)
        detections.append((found, torch.rand(len(k), generator=g, dtype=torch.float64), k))
    ours = split_errors(detections, truth, 4, TIDE, "continuous")
    assert_equals_tidecv(ours, detections, truth)
    assert sum(ours.counts.values()) > 50 and sum(g > 0 for g in ours.gains.values()) >= 4


def test_voc_s_inclusive_pixels_by_default_and_one_truth_per_image():
    """A cat box (1, 1, 10, 10) in VOC's inclusive pixels is 10 x 10; the detection (1, 1, 10, 5)
    covers 10 x 5 of it: IoU 50 / 100 = 0.5, found. Read as continuous coordinates (9 x 9 and
    9 x 4): 36 / 81 = 0.44, a localisation error."""
    images = [image([[1, 1, 10, 5]], [0.9], [[1, 1, 10, 10]])]
    dets, gts = zip(*images, strict=True)
    found = split_errors(list(dets), list(gts), 1)
    assert found.map == pytest.approx(1.0) and sum(found.counts.values()) == 0
    continuous = split_errors(list(dets), list(gts), 1, overlap="continuous")
    assert continuous.counts["localisation"] == 1 and continuous.map == 0.0
    with pytest.raises(ValueError, match="zip"):  # detections of two images, truth of one
        split_errors(list(dets) * 2, list(gts), 1)


BOUNDARIES = {  # continuous overlap with OBJECT (100 x 100): 100 x 50 is IoU 0.5, 100 x 10 0.1
    "found at IoU 0.5 exactly": [image([[0, 0, 100, 50]], [0.9], [OBJECT])],
    "localisation at 0.1 exactly": [image([[0, 0, 100, 10]], [0.8], [OBJECT])],
    "classification at 0.5 exactly": [image([[0, 0, 100, 50]], [0.7], [OBJECT], det_labels=[DOG])],
    "background at 0.1 exactly": [image([[0, 0, 100, 10]], [0.6], [OBJECT], gt_labels=[DOG])],
    "a found object again at 0.5": [image([OBJECT, [0, 0, 100, 50]], [0.9, 0.5], [OBJECT])],
    "a class with detections and no object": [
        image([OBJECT], [0.9], [OBJECT]),
        image([FAR], [0.8], [OBJECT], det_labels=[DOG]),
    ],
    "an image without objects": [image([OBJECT], [0.9], []), image([OBJECT], [0.8], [OBJECT])],
    "a class with neither before one with both": [
        image([OBJECT], [0.9], [OBJECT], det_labels=[DOG], gt_labels=[DOG])
    ],
    "a class with detections and no object before one with objects": [
        image([FAR], [0.8], [OBJECT], gt_labels=[DOG]),
        image([OBJECT], [0.9], [OBJECT], det_labels=[DOG], gt_labels=[DOG]),
    ],
    "the 101st detection counts for nothing": [
        image([FAR] * 100 + [OBJECT], [0.9 - k / 1000 for k in range(101)], [OBJECT])
    ],
}


@pytest.mark.parametrize("case", BOUNDARIES)
def test_equals_tidecv_at_its_thresholds_and_limits(case):
    """Hand-made edges of TIDE's rules (IoU exactly at 0.5 and 0.1, a class without objects, an
    image without any, its 100 detections an image): counts, AP and gains as tidecv's."""
    dets, truth = (list(t) for t in zip(*BOUNDARIES[case], strict=True))
    assert_equals_tidecv(split_errors(dets, truth, 2, TIDE, "continuous"), dets, truth)


@pytest.mark.parametrize("scoring", [DEVKIT, TIDE], ids=lambda s: s.name)
def test_nothing_to_find_and_nothing_found_is_map_0(scoring):
    """No class with objects or detections: mAP 0, as metrics.mean_ap of no class, and nothing
    to gain (tidecv itself divides by zero there)."""
    dets, truth = zip(image([], [], []), strict=True)
    found = split_errors(list(dets), list(truth), 2, scoring, "continuous")
    assert found.map == 0.0 and set(found.gains.values()) == {0.0}
