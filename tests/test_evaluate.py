"""Plot tables of the evaluation reports: the precision-recall steps, the per-class rows, the
confusion rows; the intervals file and the stage's line with its interval."""

from __future__ import annotations

import pytest
import torch
from test_metrics import image
from test_records import records_of

from pipeline_lib.base.params import parse_params
from pipeline_lib.evaluation.evaluate import (
    ap_rows,
    confusion_rows,
    intervals,
    pr_rows,
    pr_steps,
    size_rows,
    with_interval,
)
from pipeline_lib.measures.metrics import ClassAP, VocSummary


def step_area(recall: list[float], precision: list[float]) -> float:
    """Area under a step-before line through the points (each span takes its right point)."""
    spans = zip(recall[:-1], recall[1:], precision[1:], strict=True)
    return sum((r1 - r0) * p1 for r0, r1, p1 in spans)


def test_pr_steps_by_hand_first_detection_false():
    # ranked: FP, TP, TP, FP against 4 objects -> precision 0, 1/2, 2/3, 2/4; recall 0, .25, .5, .5
    c = ClassAP(1 / 3, 0.0, [0.0, 0.5, 2 / 3, 0.5], [0.0, 0.25, 0.5, 0.5], 4, 4)
    recall, precision = pr_steps(c)
    # envelope 2/3, 2/3, 2/3, 1/2: from recall 0 at 2/3 (no drop to 0 there), a corner at 0.5
    assert recall == [0.0, 0.5, 0.5]
    assert precision == pytest.approx([2 / 3, 2 / 3, 0.5])
    # its area is the devkit's all-point AP: 0.5 * 2/3 (recall beyond 0.5 never reached)
    assert step_area(recall, precision) == pytest.approx(1 / 3)


def test_pr_steps_of_a_class_without_detections_is_empty():
    assert pr_steps(ClassAP(0.0, 0.0, [], [], 3, 0)) == ([], [])


def test_tables_round_and_leave_out_classes_without_objects():
    per_class = [
        ClassAP(1.0, 1.0, [1.0], [1.0], 1, 1),
        ClassAP(None, None, [0.0], [0.0], 0, 1),
        ClassAP(0.123456, 0.1, [1.0, 0.5], [0.5, 0.5], 2, 2),
    ]
    voc = VocSummary(["cat", "dog", "cow"], per_class)
    small = [ClassAP(None, None, [], [], 0, 0), per_class[1], ClassAP(0.25, 0.3, [], [], 1, 1)]
    by_size = {"small": VocSummary(voc.classes, small), "large": voc}
    assert ap_rows(voc, by_size) == [
        {"class": "cat", "ap": 1.0, "ap_11point": 1.0, "ap_small": None, "ap_large": 1.0},
        {"class": "cow", "ap": 0.1235, "ap_11point": 0.1, "ap_small": 0.25, "ap_large": 0.1235},
    ]
    assert size_rows(by_size) == [
        {"size": "small", "map": 0.25, "objects": 1},
        {"size": "large", "map": round((1.0 + 0.123456) / 2, 4), "objects": 3},
    ]
    rows = pr_rows(voc)
    assert {"class": "cow", "recall": 0.0, "precision": 1.0} in rows
    assert [r["class"] for r in rows].count("cat") == 2  # the start at recall 0 and one corner


def test_confusion_rows_repeat_each_pair_by_its_count():
    rows = confusion_rows(torch.tensor([[1, 0], [2, 1]]), ["cat", "background"])
    assert rows == [
        {"actual": "cat", "predicted": "cat"},
        {"actual": "background", "predicted": "cat"},
        {"actual": "background", "predicted": "cat"},
        {"actual": "background", "predicted": "background"},
    ]


def test_the_stage_line_gives_the_interval():
    assert with_interval(0.28841, {"low": 0.2501, "high": 0.3302}, 0.95) == (
        "0.288 (95 % 0.250-0.330)"
    )
    assert with_interval(0.5, {"low": 0.4, "high": 0.6}, 0.9) == "0.500 (90 % 0.400-0.600)"


def test_intervals_file_from_the_records(raw_params):
    """Four images: two found (AP 1 alone), two whose detection misses (AP 0 alone). Draws mix
    them: the interval spans values below and above the figure (0.5 with the false positives
    ranked after the finds); eval.bootstrap and eval.confidence are what it says it used."""
    found = image([[0, 0, 10, 10]], [0.9], [[0, 0, 10, 10]])
    missed = image([[50, 50, 60, 60]], [0.1], [[0, 0, 10, 10]])
    records = records_of([found, missed, found, missed])
    raw_params["eval"].update(bootstrap=400, confidence=0.8)
    ev = parse_params(raw_params).eval
    bounds = intervals(records, ev)
    assert set(bounds) == {"map", "coco_map", "draws", "confidence", "seed"}
    assert (bounds["draws"], bounds["confidence"], bounds["seed"]) == (400, 0.8, 0)
    assert bounds["map"]["low"] < 0.5 < bounds["map"]["high"]
    assert bounds == intervals(records, ev)  # seeded
    raw_params["eval"]["confidence"] = 0.5
    narrower = intervals(records, parse_params(raw_params).eval)["map"]
    assert bounds["map"]["low"] <= narrower["low"] and narrower["high"] <= bounds["map"]["high"]
    same = records_of([found] * 3)
    assert intervals(same, ev)["map"] == {"low": 1.0, "high": 1.0}
