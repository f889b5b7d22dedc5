"""What the heads learn, from the prepared tables (pipeline_lib/models/targets.py), by hand: the
largest object, grid targets per level with objects exactly at a level's boundary, the ground
truth of images without objects, and the dtypes each function promises."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from pipeline_lib.boxes.geometry import ImageSpec
from pipeline_lib.models.modelcard import GridSpec, ModelCard
from pipeline_lib.models.targets import (
    GridLevel,
    box_targets,
    encoded_objects,
    grid_levels,
    grid_targets,
    ground_truth,
    image_boxes,
    image_targets,
    multi_object_targets,
    single_object_targets,
    targets_to_grid_cell_tensor,
    training_shapes,
)


def tables(boxes_by_image: dict[str, list[tuple]], size=(100, 100)):
    """Prepared-style tables: every image `size`, objects (xmin, ymin, xmax, ymax, class_id)."""
    images = pd.DataFrame(
        [{"image_id": i, "width": size[0], "height": size[1]} for i in boxes_by_image]
    )
    rows = [
        {
            "image_id": i,
            "xmin": x0,
            "ymin": y0,
            "xmax": x1,
            "ymax": y1,
            "class_id": k,
            "difficult": k == 9,
        }
        for i, boxes in boxes_by_image.items()
        for x0, y0, x1, y1, k in boxes
    ]
    columns = ["image_id", "xmin", "ymin", "xmax", "ymax", "class_id", "difficult"]
    objects = pd.DataFrame(rows, columns=columns)
    return images, objects.astype({"class_id": "int32"})  # as in the Parquet schema (tables.py)


def test_each_level_learns_the_objects_of_its_scale_and_the_boundary_goes_up():
    # 100 x 100, mode none: fractions are pixels / 100; levels: 2 x 2 for sqrt(w h) >= 0.25,
    # 4 x 4 below. Scales: 0.25 exactly (boundary: the coarse level), 0.125, and two elongated
    # boxes of sqrt(0.5 * 0.0625) = 0.177 (fine, whichever side is long).
    images, objects = tables(
        {
            "a": [
                (0, 0, 25, 25, 1),  # w = h = 0.25, centre (0.125, 0.125)
                (75, 75, 87.5, 87.5, 2),  # 0.125, centre (0.8125, 0.8125)
                (50, 0, 100, 6.25, 3),  # 0.5 x 0.0625, centre (0.75, 0.03125)
                (0, 50, 6.25, 100, 4),  # 0.0625 x 0.5, centre (0.03125, 0.75)
            ],
            "b": [],
        }
    )
    coarse = multi_object_targets(
        images, objects, ["a", "b"], ImageSpec("none", 0), GridLevel(2, scales=(0.25, 1e9))
    )
    fine = multi_object_targets(
        images, objects, ["a", "b"], ImageSpec("none", 0), GridLevel(4, scales=(0.0, 0.25))
    )
    assert coarse.objects.tolist() == [1, 0] and fine.objects.tolist() == [3, 0]
    assert coarse.has_obj[0].nonzero().tolist() == [[0, 0]] and coarse.labels[0, 0, 0] == 1
    # fine cells (row, column): (3, 3) class 2, (0, 3) class 3, (3, 0) class 4
    assert fine.has_obj[0].nonzero().tolist() == [[0, 3], [3, 0], [3, 3]]
    assert [int(fine.labels[0, r, c]) for r, c in ((3, 3), (0, 3), (3, 0))] == [2, 3, 4]
    assert fine.has_obj[1].sum() == 0 and fine.dropped.tolist() == [0, 0]
    # box of the coarse object: centre in cell units (0.125 * 2 = 0.25), size in image fractions
    assert coarse.boxes[0, :, 0, 0].tolist() == [0.25, 0.25, 0.25, 0.25]
    everything = multi_object_targets(images, objects, ["a"], ImageSpec("none", 0), GridLevel(4))
    assert everything.objects.tolist() == [4]
    for t in (coarse, fine):
        assert t.boxes.dtype == torch.float32 and t.has_obj.dtype == torch.uint8
        assert t.labels.dtype == torch.int64
        assert t.objects.dtype == torch.int64 and t.dropped.dtype == torch.int64


def test_largest_object_targets_and_images_without_one():
    images, objects = tables({"a": [(0, 0, 10, 10, 1), (20, 20, 60, 50, 2)], "b": []})
    t = single_object_targets(images, objects, ["b", "a"], ImageSpec("none", 0))
    assert t.present.tolist() == [False, True]
    assert t.labels.tolist() == [0, 2] and t.labels.dtype == torch.int64
    assert t.boxes.dtype == torch.float32 and t.present.dtype == torch.bool
    assert t.boxes[1].tolist() == [
        0.4000000059604645,
        0.3499999940395355,
        0.4000000059604645,
        0.30000001192092896,
    ]  # (0.4, 0.35, 0.4, 0.3) in float32
    assert t.boxes[0].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_ground_truth_of_images_with_and_without_objects():
    images, objects = tables(
        {"a": [(1, 2, 3, 4, 1), (5, 6, 7, 8, 9)], "b": [], "c": [(9, 9, 10, 10, 0)]}
    )
    truth = ground_truth(objects, ["c", "b", "a"])
    boxes, labels, difficult = truth[1]  # b: nothing
    assert boxes.shape == (0, 4) and labels.shape == (0,) and difficult.shape == (0,)
    boxes, labels, difficult = truth[2]
    assert boxes.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]] and labels.tolist() == [1, 9]
    assert difficult.tolist() == [False, True]
    assert truth[0][1].tolist() == [0]
    for boxes, labels, difficult in truth:
        assert boxes.dtype == torch.float64 and labels.dtype == torch.int64
        assert difficult.dtype == torch.bool


def test_image_boxes_and_training_shapes():
    images, objects = tables({"a": [(10, 20, 50, 60, 3)], "b": []}, size=(200, 100))
    encoded, labels = image_boxes(objects, 200, 100, ImageSpec("shrink", 64))
    assert encoded.flatten().tolist() == pytest.approx([0.15, 0.4, 0.2, 0.4])
    assert encoded.dtype == torch.float64
    assert labels.tolist() == [3] and labels.dtype == torch.int64
    shapes = training_shapes(images, objects, ["a", "b"], ImageSpec("shrink", 64))
    assert shapes.shape == (1, 2) and shapes.dtype == torch.float64
    assert shapes.flatten().tolist() == pytest.approx([0.2, 0.4])
    none = training_shapes(images, objects, ["b"], ImageSpec("shrink", 64))
    assert none.shape == (0, 2) and none.dtype == torch.float64


def test_lab_grid_example():
    objects = [
        {"bndbox": {"cx": 0.60, "cy": 0.65, "width": 0.84, "height": 0.75}, "class": 5},
        {"bndbox": {"cx": 0.40, "cy": 0.20, "width": 0.26, "height": 0.27}, "class": 0},
    ]
    bboxes, has_obj, labels = targets_to_grid_cell_tensor(objects, 4)
    expected = torch.zeros(4, 4, 4)
    expected[:, 0, 1] = torch.tensor([0.60, 0.80, 0.26, 0.27])
    expected[:, 2, 2] = torch.tensor([0.40, 0.60, 0.84, 0.75])
    assert bboxes.dtype == torch.float32 and torch.equal(bboxes, expected)
    assert has_obj.dtype == torch.uint8
    assert has_obj.tolist() == [[0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert labels.dtype == torch.int32
    assert labels.tolist() == [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 5, 0], [0, 0, 0, 0]]


def test_mirrored_targets_are_those_of_the_flipped_image():
    # 100 x 100, mode none: (10, 20)-(50, 60) is centre (0.3, 0.4), 0.4 x 0.4. VOC's columns 10..50
    # (1-based, inclusive) are columns 101 - 50 = 51 .. 101 - 10 = 91 once flipped: centre 0.71;
    # continuous coordinates (COCO's) mirror to 100 - x: centre 0.7. On a 2 x 2 grid, cell (0, 1)
    images, objects = tables({"a": [(10, 20, 50, 60, 3)]})
    spec = ImageSpec("none", 0)
    [(row, encoded, labels)] = encoded_objects(images, objects, ["a"], spec)  # not mirrored
    assert (row, labels.tolist()) == (0, [3])
    assert encoded[0].tolist() == pytest.approx([0.3, 0.4, 0.4, 0.4])
    single = single_object_targets(images, objects, ["a"], spec, mirrored=True)
    assert single.boxes[0].tolist() == pytest.approx([0.71, 0.4, 0.4, 0.4])
    coco = single_object_targets(images, objects, ["a"], spec, mirrored=True, inclusive=False)
    assert coco.boxes[0].tolist() == pytest.approx([0.7, 0.4, 0.4, 0.4])
    grid = multi_object_targets(images, objects, ["a"], spec, GridLevel(2), mirrored=True)
    assert grid.has_obj[0].nonzero().tolist() == [[0, 1]]
    assert grid.boxes[0, :, 0, 1].tolist() == pytest.approx([0.42, 0.8, 0.4, 0.4])  # 0.71 * 2 - 1
    plain = multi_object_targets(images, objects, ["a"], spec, GridLevel(2))
    assert plain.has_obj[0].nonzero().tolist() == [[0, 0]]


@pytest.mark.parametrize(
    ("mode", "size", "centre"),
    # a 200 x 100 image. shrink to 100: columns 10..50 flip to 201 - 50 .. 201 - 10 = 151..191,
    # centre 171 / 200; crop to 100 (the window starts after column 50): columns 60..90 are the
    # window's 10..40, flipped within it to 101 - 40 .. 101 - 10 = 61..91, centre 76 / 100
    [("shrink", 100, 171 / 200), ("crop", 100, 76 / 100)],
)
def test_one_pixel_of_the_original_is_what_the_mirror_adds(mode, size, centre):
    box = (10, 20, 50, 60, 3) if mode == "shrink" else (60, 20, 90, 60, 3)
    images, objects = tables({"a": [box]}, size=(200, 100))
    spec = ImageSpec(mode, size)
    single = single_object_targets(images, objects, ["a"], spec, mirrored=True)
    assert single.boxes[0, 0].item() == pytest.approx(centre)


def test_a_level_encodes_by_the_labs_rule_or_by_yolov5s():
    # two objects in cell (0, 0) of a 2 x 2 grid, the larger one second: the lab's rule keeps the
    # later object, YOLOv5's (grid.assign neighbours, or an anchor ratio) the smaller one
    two = torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.3, 0.3, 0.4, 0.4]], dtype=torch.float64)
    labels = torch.tensor([1, 2])
    lab = GridLevel(2).encode(two, labels)
    assert lab.has_obj.nonzero().tolist() == [[0, 0]] and lab.labels[0, 0] == 2
    # neighbours: the smaller object's host and the cells right of it and below it
    near = GridLevel(2, assign="neighbours").encode(two, labels)
    assert near.has_obj.nonzero().tolist() == [[0, 0], [0, 1], [1, 0]] and near.labels[0, 0] == 1
    # anchors 0.1 and 0.4 for a 0.15 object: the lab's best anchor (IoU 0.44 against 0.14), or
    # every anchor within the ratio (1.5 and 2.7 times its side)
    one = torch.tensor([[0.3, 0.3, 0.15, 0.15]], dtype=torch.float64)  # its neighbours inside
    anchors = torch.tensor([[0.1, 0.1], [0.4, 0.4]])
    best = GridLevel(2, anchors).encode(one, labels[:1])
    assert best.has_obj.nonzero().tolist() == [[0, 0, 0]]
    within = GridLevel(2, anchors, anchor_ratio=4.0).encode(one, labels[:1])
    assert within.has_obj.nonzero().tolist() == [[0, 0, 0], [1, 0, 0]]


def test_grid_levels_pass_their_settings_to_every_level():
    anchors = torch.tensor([[0.1, 0.2]])
    [level] = grid_levels(4, None, anchors, "neighbours", 3.0)
    assert level.num_cells == 4 and level.anchors is anchors
    assert (level.scales, level.assign, level.anchor_ratio) == (None, "neighbours", 3.0)
    coarse, fine = grid_levels(4, 0.25, None, "neighbours")
    assert (coarse.num_cells, coarse.scales, coarse.assign) == (4, (0.25, math.inf), "neighbours")
    assert (fine.num_cells, fine.scales, fine.assign) == (8, (0.0, 0.25), "neighbours")
    assert coarse.anchors is None and fine.anchors is None


def test_box_targets_by_hand():
    # a box centred at (0.5, 0.25) of size (0.5, 0.25) in a 64-pixel image: x 16..48, y 8..24
    one = (torch.tensor([[0.5, 0.25, 0.5, 0.25]], dtype=torch.float64), torch.tensor([2]))
    none = (torch.zeros(0, 4, dtype=torch.float64), torch.zeros(0, dtype=torch.int64))
    two = (
        torch.tensor([[0.5, 0.5, 1.0, 1.0], [0.25, 0.75, 0.5, 0.5]], dtype=torch.float64),
        torch.tensor([0, 1]),
    )
    card = ModelCard(
        "multi", {}, ["a", "b", "c"], [8, 2, 2], "float32", {}, ImageSpec("shrink", 64)
    )
    boxes, labels = box_targets(card, [one, none, two])
    assert boxes.shape == (3, 2, 4) and labels.tolist() == [[2, -1], [-1, -1], [0, 1]]
    assert boxes[0, 0].tolist() == [16.0, 8.0, 48.0, 24.0]
    assert boxes[2, 1].tolist() == [0.0, 32.0, 32.0, 64.0]
    targets = image_targets(boxes, labels)
    assert [len(t["labels"]) for t in targets] == [1, 0, 2]
    assert targets[0]["boxes"].tolist() == [[16.0, 8.0, 48.0, 24.0]]


def test_grid_targets_of_a_two_level_card_by_hand():
    """A 2 x 2 level for objects of scale >= 0.2, a 4 x 4 one below; an image without objects."""
    grid = GridSpec(2, None, fine_channels=8, fine_below=0.2)
    card = ModelCard(
        "multi", {}, ["a", "b", "c"], [40, 2, 2], "float32", {}, ImageSpec("shrink", 64)
    )
    card.grid = grid
    big_and_small = (
        torch.tensor([[0.25, 0.25, 0.5, 0.5], [0.875, 0.125, 0.1, 0.1]], dtype=torch.float64),
        torch.tensor([2, 1]),
    )
    none = (torch.zeros(0, 4, dtype=torch.float64), torch.zeros(0, dtype=torch.int64))
    boxes, has_obj, labels, fine_boxes, fine_has_obj, fine_labels = grid_targets(
        card, [big_and_small, none]
    )
    assert boxes.shape == (2, 4, 2, 2) and fine_boxes.shape == (2, 4, 4, 4)
    assert (boxes.dtype, has_obj.dtype, labels.dtype) == (torch.float32, torch.uint8, torch.int64)
    # the big one: cell (0, 0) of 2 x 2, centre (0.25 * 2 - 0, 0.25 * 2 - 0) within it
    assert has_obj[0].nonzero().tolist() == [[0, 0]] and labels[0, 0, 0] == 2
    assert boxes[0, :, 0, 0].tolist() == [0.5, 0.5, 0.5, 0.5]
    # the small one: row 0, column 3 of 4 x 4, centre (0.875 * 4 - 3, 0.125 * 4 - 0)
    assert fine_has_obj[0].nonzero().tolist() == [[0, 3]] and fine_labels[0, 0, 3] == 1
    assert torch.allclose(fine_boxes[0, :, 0, 3], torch.tensor([0.5, 0.5, 0.1, 0.1]))
    assert has_obj[1].sum() == 0 and fine_has_obj[1].sum() == 0
