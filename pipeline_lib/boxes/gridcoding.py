"""Grid coding of boxes: image fractions <-> cell boxes, an encoding and its inverse side by side.

Two box codings meet here (see geometry.py for pixels):
- *fractions*: (cx, cy, w, h), each a fraction of the (output) image's width or height, what
  `geometry.encode_boxes` gives and the single-object head predicts;
- *cell boxes*: on an S x S grid, the cell (row i, column j) hosting an object's centre is
  responsible for it and holds (cx * S - j, cy * S - i, w, h): the centre relative to that cell
  (in [0, 1]), the size still a fraction of the image. What the grid head predicts.

With grid.assign: neighbours (`encode_grid_yolo`) an object is also held by the two
neighbour cells nearest its centre, whose cell boxes then have a centre offset in [-0.5, 1.5].

With A anchor boxes (grid.anchors, see anchors.py) a cell has A slots, and the head's raw size
output t becomes anchor * (2 sigmoid(t))^2. The lab's head puts an object in the slot of its
best-IoU anchor (`encode_grid`); the conv heads in every slot whose anchor's shape is within
grid.anchor_ratio of the object's (`encode_grid_yolo`, YOLOv5's rule).

Shapes: fractions (K, 4); one image's cell boxes (4, S, S), or (A, 4, S, S) with anchors; a batch
adds B in front. Cells are listed in row-major order (i, then j), anchor by anchor. Tensors made
here take the device of the function's inputs (a head's outputs on a GPU are decoded there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline_lib.boxes.anchors import anchor_matches, best_anchor


@dataclass
class GridEncoding:
    """One image's grid targets. boxes (4, S, S) float32 cell boxes, has_obj (S, S) uint8,
    labels (S, S) int64 (with A anchors: (A, 4, S, S) and (A, S, S)); `dropped` is the number of
    objects overwritten by a later one in the same cell (and anchor slot)."""

    boxes: torch.Tensor
    has_obj: torch.Tensor
    labels: torch.Tensor
    dropped: int


def hosting_cells(fractions: torch.Tensor, num_cells: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row i, column j) of the cell hosting each (K, 4) fraction box's centre, as int64 (K,).

    A centre exactly on the right or bottom edge (1.0) belongs to the last cell.
    """
    j = (fractions[:, 0] * num_cells).floor().long().clamp(0, num_cells - 1)
    i = (fractions[:, 1] * num_cells).floor().long().clamp(0, num_cells - 1)
    return i, j


def encode_grid(
    fractions: torch.Tensor,
    labels: torch.Tensor,
    num_cells: int,
    anchors: torch.Tensor | None = None,
) -> GridEncoding:
    """One image's (K, 4) fraction boxes and (K,) labels -> its grid targets.

    A later object whose centre falls in the same cell overwrites an earlier one (as in the lab).
    With (A, 2) `anchors` (w, h), each object goes to its best anchor's slot of the cell, and is
    overwritten only by a later one in the same cell and slot.
    """
    s, device = num_cells, fractions.device
    slots = 1 if anchors is None else len(anchors)
    boxes = torch.zeros(slots, 4, s, s, dtype=torch.float32, device=device)
    has_obj = torch.zeros(slots, s, s, dtype=torch.uint8, device=device)
    cell_labels = torch.zeros(slots, s, s, dtype=torch.int64, device=device)
    fractions = fractions.double()
    i, j = hosting_cells(fractions, s)
    a = torch.zeros_like(i) if anchors is None else best_anchor(fractions[:, 2:], anchors)
    for k in range(len(fractions)):
        cx, cy, w, h = fractions[k].tolist()
        cell = (cx * s - j[k].item(), cy * s - i[k].item(), w, h)
        boxes[a[k], :, i[k], j[k]] = fractions.new_tensor(cell).float()
        has_obj[a[k], i[k], j[k]] = 1
        cell_labels[a[k], i[k], j[k]] = labels[k]
    dropped = len(fractions) - int(has_obj.sum())
    if anchors is None:
        return GridEncoding(boxes[0], has_obj[0], cell_labels[0], dropped)
    return GridEncoding(boxes, has_obj, cell_labels, dropped)


def encode_grid_yolo(
    fractions: torch.Tensor,
    labels: torch.Tensor,
    num_cells: int,
    anchors: torch.Tensor | None = None,
    ratio: float = 4.0,
    neighbours: bool = True,
) -> GridEncoding:
    """One image's (K, 4) fraction boxes and (K,) labels -> grid targets by YOLOv5's rules, where
    an object may hold several cells and anchor slots:
    - cells (grid.assign): the cell hosting its centre and, with `neighbours`, the horizontal
      neighbour on the side its centre is nearer to and the vertical one likewise (the right and
      lower ones for a centre at the cell's exact middle; when inside the grid): more positives
      per object, each seeing it from around. Boxes keep the cell coding, (cx * S - j,
      cy * S - i, w, h): a neighbour holds a centre offset in [-0.5, 0] or [1, 1.5], which
      `decode_grid` inverts as for any cell;
    - slots: with (A, 2) `anchors`, every anchor within `ratio` of its shape
      (`anchors.anchor_matches`), in each of those cells; without, the one slot.
    A slot of a cell claimed by two objects goes to the smaller one (FCOS's rule), and a hosting
    cell beats a neighbour cell; `dropped` counts the objects left with no slot at all.
    """
    s, device = num_cells, fractions.device
    slots = 1 if anchors is None else len(anchors)
    boxes = torch.zeros(slots, 4, s, s, dtype=torch.float32, device=device)
    has_obj = torch.zeros(slots, s, s, dtype=torch.uint8, device=device)
    cell_labels = torch.zeros(slots, s, s, dtype=torch.int64, device=device)
    fractions = fractions.double()
    i, j = hosting_cells(fractions, s)
    owner = torch.full((slots, s, s), -1, dtype=torch.int64, device=device)
    if anchors is None:
        fits = [[0]] * len(fractions)
    else:
        fits = [
            row.nonzero().flatten().tolist()
            for row in anchor_matches(fractions[:, 2:], anchors, ratio)
        ]
    # Larger objects first, so that a smaller one overwrites them; neighbours before hosts.
    order = torch.argsort(fractions[:, 2] * fractions[:, 3], descending=True, stable=True).tolist()
    near_x = torch.where(fractions[:, 0] * s - j < 0.5, -1, 1)
    near_y = torch.where(fractions[:, 1] * s - i < 0.5, -1, 1)
    cells = [[(i[k], j[k] + near_x[k]), (i[k] + near_y[k], j[k])] for k in range(len(i))]
    passes = [[(i[k], j[k])] for k in range(len(i))]
    for pass_cells in ([cells] if neighbours else []) + [passes]:
        for k in order:
            for row, col in pass_cells[k]:
                row, col = int(row), int(col)
                if 0 <= row < s and 0 <= col < s:
                    for a in fits[k]:
                        owner[a, row, col] = k
    for a, row, col in (owner >= 0).nonzero().tolist():
        k = int(owner[a, row, col])
        cx, cy, w, h = fractions[k].tolist()
        boxes[a, :, row, col] = fractions.new_tensor((cx * s - col, cy * s - row, w, h)).float()
        has_obj[a, row, col], cell_labels[a, row, col] = 1, labels[k]
    dropped = len(fractions) - len(owner[owner >= 0].unique())
    if anchors is None:
        return GridEncoding(boxes[0], has_obj[0], cell_labels[0], dropped)
    return GridEncoding(boxes, has_obj, cell_labels, dropped)


def decode_grid(cell_boxes: torch.Tensor) -> torch.Tensor:
    """(B, 4, S, S) cell boxes -> (B, S*S, 4) fraction boxes, cells in row-major order.

    With anchors, (B, A, 4, S, S) -> (B, A*S*S, 4), anchor by anchor. The inverse of
    `encode_grid` for every cell that holds an object.
    """
    if cell_boxes.dim() == 5:
        return decode_grid(cell_boxes.flatten(0, 1)).reshape(len(cell_boxes), -1, 4)
    return decode_grid_map(cell_boxes).transpose(1, 2)


def decode_grid_map(cell_boxes: torch.Tensor) -> torch.Tensor:
    """(B, 4, H, W) cell boxes of an H x W grid -> (B, 4, H*W) fraction boxes (cx, cy, w, h),
    cells in row-major order: cx = (x + j) / W, cy = (y + i) / H."""
    b, _, height, width = cell_boxes.shape
    rows, columns = (torch.arange(n, device=cell_boxes.device) for n in (height, width))
    i, j = torch.meshgrid(rows, columns, indexing="ij")
    cx = (cell_boxes[:, 0] + j) / width
    cy = (cell_boxes[:, 1] + i) / height
    return torch.stack([cx, cy, cell_boxes[:, 2], cell_boxes[:, 3]], dim=1).flatten(2)


def raw_cell_boxes(raw: torch.Tensor, anchors: torch.Tensor | None = None) -> torch.Tensor:
    """The conv heads' raw box outputs -> cell boxes: (B, 4, S, S) (with anchors (B, A, 4, S, S)
    and (A, 2) `anchors`) -> the same shape, the centre 2 sigmoid(t) - 0.5 of a cell from the
    cell's corner, in [-0.5, 1.5] so that a cell can reach the centre of an object in a
    neighbour cell (YOLOv5's form), the size sigmoid(t), a fraction of the image, or with
    anchors `anchor_sizes` of it."""
    axis = raw.dim() - 3  # the coordinates' axis: 1, or 2 after the anchors'
    centres = 2 * torch.sigmoid(raw.narrow(axis, 0, 2)) - 0.5
    sizes = torch.sigmoid(raw.narrow(axis, 2, 2))
    if anchors is not None:
        sizes = anchor_sizes(sizes, anchors)
    return torch.cat([centres, sizes], dim=axis)


def fold_anchors(
    pred_boxes: torch.Tensor,
    logits: torch.Tensor,
    boxes: torch.Tensor,
    has_obj: torch.Tensor,
    labels: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """Anchor-head tensors ((B, A, 4, S, S), (B, A, K + 1, S, S), (B, A, 4, S, S), (B, A, S, S),
    (B, A, S, S)) -> the same with B * A rows, i.e. the anchor-free head's shapes (which are
    returned as they are): each anchor slot a grid of its own, for the losses and measures."""
    if pred_boxes.dim() == 4:
        return pred_boxes, logits, boxes, has_obj, labels
    return tuple(t.flatten(0, 1) for t in (pred_boxes, logits, boxes, has_obj, labels))


def anchor_sizes(raw: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Box sizes from the head's sigmoid outputs: (B, A, 2, S, S) in [0, 1] and (A, 2) anchors
    (w, h) -> (B, A, 2, S, S) = anchor * (2 raw)^2 (YOLOv5's form: the anchor itself at raw = 0.5,
    bounded by 4 x anchor)."""
    return (2 * raw) ** 2 * anchors.view(1, len(anchors), 2, 1, 1)


def cell_local(cell_boxes: torch.Tensor, num_cells: int) -> torch.Tensor:
    """(..., 4) cell boxes -> the same boxes in image fractions up to their cell's offset (the
    centre divided by S): two boxes of one cell then have the IoU of their decoded forms."""
    return cell_boxes * cell_boxes.new_tensor([1 / num_cells] * 2 + [1.0, 1.0])


def cell_fractions(num_cells: int) -> torch.Tensor:
    """The S x S cells themselves as (S*S, 4) fraction boxes, row-major (for drawing the grid)."""
    s = num_cells
    i, j = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    centres = torch.stack([(j.flatten() + 0.5) / s, (i.flatten() + 0.5) / s], dim=1)
    return torch.cat([centres, torch.full_like(centres, 1 / s)], dim=1)
