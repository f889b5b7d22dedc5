"""Grid coding (gridcoding.py): fraction boxes <-> cell boxes, by hand and as properties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pipeline_lib.boxes.gridcoding import (
    anchor_sizes,
    cell_fractions,
    cell_local,
    decode_grid,
    decode_grid_map,
    encode_grid,
    encode_grid_yolo,
    fold_anchors,
    hosting_cells,
    raw_cell_boxes,
)


def test_encode_one_image_by_hand():
    # 2 x 2 cells: centre (0.75, 0.25) -> row 0, column 1, offsets (0.5, 0.5) in the cell
    grid = encode_grid(
        torch.tensor([[0.75, 0.25, 0.5, 0.25]], dtype=torch.float64), torch.tensor([3]), 2
    )
    boxes, has_obj, labels, dropped = grid.boxes, grid.has_obj, grid.labels, grid.dropped
    assert boxes.shape == (4, 2, 2) and boxes.dtype == torch.float32
    assert boxes[:, 0, 1].tolist() == [0.5, 0.5, 0.5, 0.25]
    assert has_obj.dtype == torch.uint8 and has_obj.tolist() == [[0, 1], [0, 0]]
    assert labels.dtype == torch.int64 and labels.tolist() == [[0, 3], [0, 0]]
    assert dropped == 0


def test_collisions_later_wins_and_edges_go_to_the_last_cell():
    encoded = torch.tensor([[0.1, 0.1, 0.2, 0.2], [0.2, 0.2, 0.3, 0.3], [1.0, 1.0, 0.1, 0.1]])
    grid = encode_grid(encoded, torch.tensor([1, 2, 3]), 2)
    boxes, has_obj, labels, dropped = grid.boxes, grid.has_obj, grid.labels, grid.dropped
    assert dropped == 1  # the first two share cell (0, 0): the second wins
    assert labels[0, 0] == 2 and torch.allclose(boxes[:, 0, 0], torch.tensor([0.4, 0.4, 0.3, 0.3]))
    assert labels[1, 1] == 3 and torch.allclose(boxes[:, 1, 1], torch.tensor([1.0, 1.0, 0.1, 0.1]))
    assert has_obj.sum() == 2


def test_encode_with_anchors_by_hand():
    anchors = torch.tensor([[0.1, 0.1], [0.6, 0.3]])
    # S = 2. Objects 0 and 1 share cell (0, 0) but not their best anchor; object 2 shares cell
    # (0, 0) and anchor 0 with object 0 and overwrites it.
    encoded = torch.tensor(
        [
            [0.20, 0.30, 0.10, 0.12],  # cell (0, 0), anchor 0
            [0.25, 0.40, 0.50, 0.30],  # cell (0, 0), anchor 1
            [0.30, 0.10, 0.08, 0.10],  # cell (0, 0), anchor 0: replaces object 0
            [0.75, 0.90, 0.70, 0.20],  # cell (1, 1), anchor 1
        ]
    )
    labels = torch.tensor([3, 4, 5, 6])
    grid = encode_grid(encoded, labels, 2, anchors)
    boxes, has_obj, cell_labels, dropped = grid.boxes, grid.has_obj, grid.labels, grid.dropped
    assert boxes.shape == (2, 4, 2, 2) and has_obj.shape == cell_labels.shape == (2, 2, 2)
    assert dropped == 1
    assert has_obj.tolist() == [[[1, 0], [0, 0]], [[1, 0], [0, 1]]]
    assert cell_labels[0, 0, 0] == 5 and cell_labels[1, 0, 0] == 4 and cell_labels[1, 1, 1] == 6
    # centres in cell units: 0.3 * 2 - 0 = 0.6, 0.1 * 2 - 0 = 0.2; 0.75 * 2 - 1 = 0.5, 0.9 * 2 - 1
    assert boxes[0, :, 0, 0].tolist() == pytest.approx([0.6, 0.2, 0.08, 0.10])
    assert boxes[1, :, 1, 1].tolist() == pytest.approx([0.5, 0.8, 0.70, 0.20])
    # without anchors the three objects of cell (0, 0) keep one: two are dropped
    assert encode_grid(encoded, labels, 2).dropped == 2


@given(
    st.floats(0, 1, exclude_max=True),
    st.floats(0, 1, exclude_max=True),
    st.floats(1e-3, 1),
    st.floats(1e-3, 1),
    st.integers(1, 19),
)
def test_grid_cell_encoding_round_trips_for_every_grid_size(cx, cy, w, h, cells):
    encoded = torch.tensor([[cx, cy, w, h]], dtype=torch.float64)
    grid = encode_grid(encoded, torch.tensor([3]), cells)
    boxes, has_obj, labels, dropped = grid.boxes, grid.has_obj, grid.labels, grid.dropped
    i, j = int(cy * cells), int(cx * cells)  # the cell hosting the centre
    assert has_obj.sum() == 1 and has_obj[i, j] == 1 and labels[i, j] == 3 and dropped == 0
    assert ((boxes[:2] >= 0) & (boxes[:2] <= 1)).all()  # centre relative to its cell
    decoded = decode_grid(boxes.unsqueeze(0).double())[0, i * cells + j]
    assert torch.allclose(decoded, encoded[0], atol=1e-6)


def test_hosting_cells_by_hand():
    # S = 4: x 0.3 -> column 1, y 0.9 -> row 3; an edge centre (1.0) is in the last cell
    fractions = torch.tensor([[0.3, 0.9, 0.1, 0.1], [1.0, 0.0, 0.1, 0.1], [0.25, 0.5, 0.1, 0.1]])
    i, j = hosting_cells(fractions, 4)
    assert i.tolist() == [3, 0, 2] and j.tolist() == [1, 3, 1]


def test_decode_with_anchors_goes_anchor_by_anchor():
    # B = 1, A = 2, S = 1: two slots of the one cell, listed anchor by anchor
    cell_boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.3], [0.25, 0.75, 0.4, 0.1]]]).view(1, 2, 4, 1, 1)
    expected = [0.5, 0.5, 0.2, 0.3, 0.25, 0.75, 0.4, 0.1]
    assert decode_grid(cell_boxes)[0].flatten().tolist() == pytest.approx(expected)


def test_anchor_sizes_by_hand():
    anchors = torch.tensor([[0.2, 0.1], [0.5, 0.4]])
    raw = torch.tensor([[0.5, 0.25], [1.0, 0.0]]).view(1, 2, 2, 1, 1)
    # anchor * (2 raw)^2: (0.2 * 1, 0.1 * 0.25) and (0.5 * 4, 0.4 * 0)
    sizes = anchor_sizes(raw, anchors).flatten().tolist()
    assert sizes == pytest.approx([0.2, 0.025, 2.0, 0.0])


def test_cell_local_keeps_the_iou_of_the_decoded_boxes():
    # S = 4, cell (row 1, column 2): the decoded centres are (2 + x) / 4, (1 + y) / 4
    from torchvision.ops import box_convert, box_iou

    a, b = torch.tensor([[0.5, 0.5, 0.2, 0.3]]), torch.tensor([[0.7, 0.4, 0.25, 0.2]])
    assert cell_local(a, 4).flatten().tolist() == pytest.approx([0.125, 0.125, 0.2, 0.3])
    decoded = [torch.tensor([[(2 + t[0, 0]) / 4, (1 + t[0, 1]) / 4, *t[0, 2:]]]) for t in (a, b)]
    local = [cell_local(t, 4) for t in (a, b)]
    iou = [box_iou(*(box_convert(t, "cxcywh", "xyxy") for t in pair)) for pair in (decoded, local)]
    assert iou[0].item() == pytest.approx(iou[1].item())


def test_cell_fractions_tile_the_image():
    cells = cell_fractions(2)
    assert cells.tolist() == [
        [0.25, 0.25, 0.5, 0.5],
        [0.75, 0.25, 0.5, 0.5],
        [0.25, 0.75, 0.5, 0.5],
        [0.75, 0.75, 0.5, 0.5],
    ]


def test_neighbour_assignment_by_hand():
    # S = 4. Object 0: centre (0.30, 0.60) -> host (row 2, col 1), offsets (0.2, 0.4): nearer
    # the left and the top, so its neighbours are (2, 0) and (1, 1).
    big = [0.30, 0.60, 0.5, 0.5]
    grid = encode_grid_yolo(torch.tensor([big], dtype=torch.float64), torch.tensor([4]), 4)
    assert grid.has_obj.nonzero().tolist() == [[1, 1], [2, 0], [2, 1]]
    assert grid.boxes[:, 2, 1].tolist() == pytest.approx([0.2, 0.4, 0.5, 0.5])
    assert grid.boxes[:, 2, 0].tolist() == pytest.approx([1.2, 0.4, 0.5, 0.5])  # cx * 4 - 0
    assert grid.boxes[:, 1, 1].tolist() == pytest.approx([0.2, 1.4, 0.5, 0.5])  # cy * 4 - 1
    assert (grid.labels[grid.has_obj.bool()] == 4).all() and grid.dropped == 0
    # the decoded boxes of all three cells are the object itself
    fractions = decode_grid(grid.boxes.unsqueeze(0))[0]
    for row, col in ((1, 1), (2, 0), (2, 1)):
        assert fractions[row * 4 + col].tolist() == pytest.approx(big)
    # a small object hosted in (2, 0), near its right edge: its host beats object 0's neighbour
    # claim, its neighbour (2, 1) loses to object 0's host; (3, 0) is below it (offset 0.6)
    small = [0.20, 0.65, 0.1, 0.1]
    both = torch.tensor([big, small], dtype=torch.float64)
    grid = encode_grid_yolo(both, torch.tensor([4, 5]), 4)
    owners = {tuple(c): int(grid.labels[tuple(c)]) for c in grid.has_obj.nonzero().tolist()}
    assert owners == {(1, 1): 4, (2, 1): 4, (2, 0): 5, (3, 0): 5}
    assert grid.dropped == 0
    # two objects with one centre claim the same three cells: the smaller gets them all
    same = torch.tensor([[0.2, 0.2, 0.3, 0.3], [0.2, 0.2, 0.05, 0.05]], dtype=torch.float64)
    grid = encode_grid_yolo(same, torch.tensor([1, 2]), 4)
    assert grid.labels[grid.has_obj.bool()].tolist() == [2, 2, 2] and grid.dropped == 1
    # at the grid's edge the neighbour outside is skipped; an object with no cell is dropped
    corner = torch.tensor([[0.05, 0.05, 0.3, 0.3], [0.06, 0.06, 0.01, 0.01]], dtype=torch.float64)
    grid = encode_grid_yolo(corner, torch.tensor([1, 2]), 1)
    assert grid.has_obj.tolist() == [[1]] and grid.labels[0, 0] == 2 and grid.dropped == 1


def test_anchored_assignment_by_hand():
    """YOLOv5's rule: a 0.2 x 0.2 object goes to every anchor within the ratio (0.1: 2x, 0.3:
    1.5x; 0.9 is 4.5x), in its host cell and its two nearest neighbours; with a tighter ratio to
    fewer anchors, never to none (its best-IoU anchor, 0.3: IoU 0.44 against 0.25)."""
    anchors = torch.tensor([[0.1, 0.1], [0.3, 0.3], [0.9, 0.9]])
    obj = torch.tensor([[0.3, 0.3, 0.2, 0.2]], dtype=torch.float64)  # S = 4: host (1, 1)
    cells = [[1, 0], [0, 1], [1, 1]]  # offsets 0.2, 0.2: the left and upper neighbours
    for ratio, slots in [(4.0, [0, 1]), (1.6, [1]), (1.2, [1])]:
        grid = encode_grid_yolo(obj, torch.tensor([2]), 4, anchors, ratio)
        held = grid.has_obj.nonzero().tolist()
        assert sorted(held) == sorted([a, *cell] for a in slots for cell in cells), ratio
        assert grid.boxes[slots[0], :, 1, 0].tolist() == pytest.approx([1.2, 0.2, 0.2, 0.2])
        assert grid.dropped == 0 and (grid.labels[grid.has_obj.bool()] == 2).all()
    # centre only: the host cell in each anchor that fits
    grid = encode_grid_yolo(obj, torch.tensor([2]), 4, anchors, 4.0, neighbours=False)
    assert grid.has_obj.nonzero().tolist() == [[0, 1, 1], [1, 1, 1]]
    # a smaller object on the same centre and shape class takes the shared slots
    two = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.3, 0.3, 0.15, 0.15]], dtype=torch.float64)
    grid = encode_grid_yolo(two, torch.tensor([2, 0]), 4, anchors, 4.0)
    assert grid.labels[grid.has_obj.bool()].unique().tolist() == [0] and grid.dropped == 1


def test_decode_grid_map_on_a_wide_grid_by_hand():
    # H = 2 rows, W = 4 columns: cell (1, 3) holding (0.5, 0.5, w, h) -> centre (3.5/4, 1.5/2)
    cells = torch.zeros(1, 4, 2, 4)
    cells[0, :, 1, 3] = torch.tensor([0.5, 0.5, 0.2, 0.4])
    assert decode_grid_map(cells)[0, :, 7].tolist() == pytest.approx([0.875, 0.75, 0.2, 0.4])


def test_yolo_assignment_details_by_hand():
    """The targets' dtypes, the smaller object by area (not by shape) winning a shared cell, the
    neighbour on the right and below for a centre at a cell's exact middle, the default ratio."""
    one = torch.tensor([[0.3, 0.3, 0.2, 0.2]], dtype=torch.float64)
    grid = encode_grid_yolo(one, torch.tensor([2]), 4)
    assert grid.boxes.dtype == torch.float32 and grid.boxes.shape == (4, 4, 4)
    assert grid.has_obj.dtype == torch.uint8 and grid.labels.dtype == torch.int64
    # on one centre a tall (0.1 x 0.4) or wide (0.4 x 0.1) object and a 0.15 square: the square
    # is the smaller by area (0.0225 < 0.04), though not by w / h or by h^2 against the other
    for other in ([0.1, 0.4], [0.4, 0.1]):
        both = torch.tensor([[0.3, 0.3, *other], [0.3, 0.3, 0.15, 0.15]], dtype=torch.float64)
        grid = encode_grid_yolo(both, torch.tensor([1, 2]), 4)
        assert grid.labels[grid.has_obj.bool()].tolist() == [2, 2, 2] and grid.dropped == 1
    # S = 4, centre (0.375, 0.625): host (2, 1), offsets exactly 0.5 -> neighbours (2, 2), (3, 1)
    middle = torch.tensor([[0.375, 0.625, 0.2, 0.2]], dtype=torch.float64)
    grid = encode_grid_yolo(middle, torch.tensor([2]), 4)
    assert grid.has_obj.nonzero().tolist() == [[2, 1], [2, 2], [3, 1]]
    # the default ratio is YOLOv5's 4: an anchor 4.5 times the object's side is not a match
    anchors = torch.tensor([[0.2, 0.2], [0.9, 0.9]])
    grid = encode_grid_yolo(one, torch.tensor([2]), 4, anchors, neighbours=False)
    assert grid.has_obj.nonzero().tolist() == [[0, 1, 1]]


def test_raw_cell_boxes_by_hand():
    # raw 0 -> centre 2 * 0.5 - 0.5 = 0.5 (the cell's middle), size 0.5; raw +-inf -> the bounds
    raw = torch.tensor([0.0, 0.0, 0.0, 0.0]).view(1, 4, 1, 1)
    assert raw_cell_boxes(raw).flatten().tolist() == [0.5, 0.5, 0.5, 0.5]
    far = torch.tensor([100.0, -100.0, 100.0, -100.0]).view(1, 4, 1, 1)
    assert raw_cell_boxes(far).flatten().tolist() == [1.5, -0.5, 1.0, 0.0]
    # with anchors (B, A, 4, S, S): raw 0 -> the anchor itself, (2 * 0.5)^2 = 1 times it;
    # raw +inf -> 4 times it
    anchors = torch.tensor([[0.2, 0.4], [0.1, 0.05]])
    raw = torch.zeros(1, 2, 4, 1, 1)
    raw[0, 1, 2:] = 100.0
    boxes = raw_cell_boxes(raw, anchors)[0, :, :, 0, 0]
    assert torch.allclose(boxes, torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.5, 0.5, 0.4, 0.2]]))


def test_fold_anchors_makes_each_slot_a_grid_of_its_own():
    b, a, k, s = 2, 3, 4, 5
    tensors = (
        torch.randn(b, a, 4, s, s),
        torch.randn(b, a, k + 1, s, s),
        torch.rand(b, a, 4, s, s),
        torch.randint(0, 2, (b, a, s, s)),
        torch.randint(0, k, (b, a, s, s)),
    )
    folded = fold_anchors(*tensors)
    assert [t.shape[0] for t in folded] == [b * a] * 5
    assert torch.equal(folded[0][1 * a + 2], tensors[0][1, 2])  # image 1, anchor 2
    plain = tuple(t[:, 0] for t in tensors)
    assert all(x is y for x, y in zip(fold_anchors(*plain), plain, strict=True))
