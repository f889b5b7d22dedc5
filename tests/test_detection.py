"""From head outputs to detections (pipeline_lib/boxes/detection.py), on small examples worked
out by hand: thresholds at their exact value, ties, caps, several images and levels."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from pipeline_lib.boxes.detection import (
    Filtering,
    cell_scores,
    decode_image,
    grid_detections,
    single_detections,
)
from pipeline_lib.boxes.geometry import ImageSpec
from pipeline_lib.boxes.gridcoding import decode_grid
from pipeline_lib.models.targets import GridLevel, multi_object_targets


def cells(*rows):
    """Encoded boxes (N, 4) and their scores (N,) and labels (N,) from (cx, cy, w, h, score,
    label) rows, in a 100 x 100 image with image.mode none."""
    t = torch.tensor(rows, dtype=torch.float64)
    return t[:, :4], t[:, 4], t[:, 5].long()


def test_a_score_exactly_at_the_threshold_is_kept():
    encoded, scores, labels = cells((0.2, 0.2, 0.1, 0.1, 0.5, 0), (0.7, 0.7, 0.1, 0.1, 0.25, 1))
    kept = decode_image(
        encoded, scores, labels, (100, 100), ImageSpec("none", 0), Filtering(0.5, None, 10)
    )
    assert kept.scores.tolist() == [0.5] and kept.labels.tolist() == [0]
    assert kept.boxes.tolist() == [[15.0, 15.0, 25.0, 25.0]]


def test_without_nms_equal_scores_keep_their_cell_order_and_the_cap_applies():
    rows = [(0.1 * k + 0.05, 0.5, 0.05, 0.05, 0.3, k % 2) for k in range(6)]
    encoded, scores, labels = cells(*rows)
    scores[4] = 0.9
    kept = decode_image(
        encoded, scores, labels, (100, 100), ImageSpec("none", 0), Filtering(0.1, None, 4)
    )
    # the best first, then the ties in cell order (a stable sort), cut at 4
    assert kept.labels.tolist() == [0, 0, 1, 0]
    assert [round(b[0], 3) for b in kept.boxes.tolist()] == [42.5, 2.5, 12.5, 22.5]
    assert kept.scores.dtype == scores.dtype and kept.boxes.dtype == torch.float32


def test_nms_is_per_class_and_capped():
    # two overlapping boxes of class 0 (IoU 0.81) and one of class 1 on the same place
    encoded, scores, labels = cells(
        (0.5, 0.5, 0.2, 0.2, 0.9, 0), (0.51, 0.5, 0.2, 0.2, 0.8, 0), (0.5, 0.5, 0.2, 0.2, 0.7, 1)
    )
    kept = decode_image(
        encoded, scores, labels, (100, 100), ImageSpec("none", 0), Filtering(0.1, 0.5, 10)
    )
    assert kept.scores.tolist() == pytest.approx([0.9, 0.7]) and kept.labels.tolist() == [0, 1]
    capped = decode_image(
        encoded, scores, labels, (100, 100), ImageSpec("none", 0), Filtering(0.1, 0.5, 1)
    )
    assert capped.scores.tolist() == pytest.approx([0.9])


def grid(boxes_by_cell, s=2, classes=2):
    """(1, 4, s, s) boxes and (1, classes + 1, s, s) logits; `boxes_by_cell` maps (row, col) to
    ((cx, cy, w, h), class, objectness logit); other cells get a very low objectness."""
    boxes = torch.zeros(1, 4, s, s)
    logits = torch.zeros(1, classes + 1, s, s)
    logits[0, -1] = -20.0
    for (i, j), (box, label, obj) in boxes_by_cell.items():
        boxes[0, :, i, j] = torch.tensor(box)
        logits[0, label, i, j] = 30.0  # softmax probability 1 for this class
        logits[0, -1, i, j] = obj
    return boxes, logits


def test_grid_detections_per_image_levels_and_cap():
    # image 1: one object in cell (0, 1); image 2: two objects, in (0, 0) and (1, 1)
    a_boxes, a_logits = grid({(0, 1): ((0.5, 0.5, 0.5, 0.5), 1, 3.0)})
    b_boxes, b_logits = grid(
        {(0, 0): ((0.5, 0.5, 0.2, 0.2), 0, 2.0), (1, 1): ((0.5, 0.5, 0.4, 0.4), 1, 1.0)}
    )
    boxes, logits = torch.cat([a_boxes, b_boxes]), torch.cat([a_logits, b_logits])
    first, second = grid_detections(
        boxes, logits, [(200, 100), (100, 100)], ImageSpec("shrink", 64), Filtering(0.5, 0.5, 10)
    )
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    # image 1, 200 x 100: centre (1.5 / 2 * 200, 0.5 / 2 * 100) = (150, 25), size 100 x 50
    assert first.boxes.tolist() == [[100.0, 0.0, 200.0, 50.0]]
    assert first.labels.tolist() == [1] and first.scores.tolist() == pytest.approx([sigmoid(3)])
    assert second.labels.tolist() == [0, 1]
    assert second.scores.tolist() == pytest.approx([sigmoid(2), sigmoid(1)])
    assert second.boxes.flatten().tolist() == pytest.approx([15, 15, 35, 35, 55, 55, 95, 95])
    # max_detections reaches every image
    capped = grid_detections(
        boxes, logits, [(200, 100), (100, 100)], ImageSpec("shrink", 64), Filtering(0.5, 0.5, 1)
    )
    assert [len(d) for d in capped] == [1, 1] and capped[1].labels.tolist() == [0]
    # two levels: the second level's cells join the first's before NMS
    merged = grid_detections(
        [a_boxes, b_boxes],
        [a_logits, b_logits],
        [(100, 100)],
        ImageSpec("none", 0),
        Filtering(0.5, 0.5, 10),
    )
    assert sorted(merged[0].scores.tolist()) == pytest.approx(
        sorted([sigmoid(3), sigmoid(2), sigmoid(1)])
    )


def test_single_detections_give_each_image_its_own_box():
    pred = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.25, 0.25, 0.5, 0.5], [0.5, 0.75, 1.0, 0.5]])
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(4.0), 0.0], [0.0, 0.0]])
    found = single_detections(
        pred, logits, [(100, 100), (200, 100), (40, 80)], ImageSpec("shrink", 224)
    )
    assert [len(d) for d in found] == [1, 1, 1]
    assert [d.labels.tolist() for d in found] == [[1], [0], [0]]  # a tie: the first class
    assert [d.scores.item() for d in found] == pytest.approx([0.75, 0.8, 0.5])
    assert found[0].boxes.tolist() == [[25.0, 25.0, 75.0, 75.0]]
    assert found[1].boxes.tolist() == [[0.0, 0.0, 100.0, 50.0]]
    assert found[2].boxes.tolist() == [[0.0, 40.0, 40.0, 80.0]]


def test_grid_encode_decode_round_trip():
    """Objects of a 400 x 300 image under shrink -> grid -> decoded boxes in original pixels."""
    xyxy = torch.tensor([[10.0, 20, 110, 220], [200, 50, 390, 290], [150, 100, 180, 140]])
    images = pd.DataFrame([{"image_id": "a", "width": 400, "height": 300}])
    objects = pd.DataFrame(xyxy.numpy(), columns=["xmin", "ymin", "xmax", "ymax"])
    objects["image_id"], objects["class_id"] = "a", [0, 1, 2]
    t = multi_object_targets(images, objects, ["a"], ImageSpec("shrink", 224), GridLevel(7))
    assert t.objects.tolist() == [3] and t.dropped.tolist() == [0]
    logits = torch.full((1, 4, 7, 7), -20.0)
    logits[0, t.labels[0], torch.arange(7)[:, None], torch.arange(7)[None, :]] = 20.0
    logits[0, -1] = torch.where(t.has_obj[0].bool(), 20.0, -20.0)
    scores, labels = cell_scores(logits)
    det = decode_image(
        decode_grid(t.boxes)[0],
        scores[0],
        labels[0],
        (400, 300),
        ImageSpec("shrink", 224),
        Filtering(0.5, 0.5, 100),
    )
    order = torch.argsort(det.labels)
    assert det.labels[order].tolist() == [0, 1, 2]
    assert torch.allclose(det.boxes[order], xyxy, atol=1e-3)


def test_nms_removes_duplicates_per_class():
    encoded = torch.tensor([[0.5, 0.5, 0.4, 0.4], [0.51, 0.5, 0.4, 0.4], [0.5, 0.5, 0.4, 0.4]])
    scores, labels = torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0, 0, 1])
    before = decode_image(
        encoded, scores, labels, (100, 100), ImageSpec("none", 0), Filtering(0.2, None, 100)
    )
    after = decode_image(
        encoded, scores, labels, (100, 100), ImageSpec("none", 0), Filtering(0.2, 0.5, 100)
    )
    assert len(before) == 3
    assert after.scores.tolist() == pytest.approx([0.9, 0.7]) and after.labels.tolist() == [0, 1]
    assert (
        len(
            decode_image(
                encoded, scores, labels, (100, 100), ImageSpec("none", 0), Filtering(0.85, 0.5, 100)
            )
        )
        == 1
    )
