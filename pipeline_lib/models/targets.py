"""What the heads learn to predict, built from the prepared tables for the rows of a feature file.

Single-object task: for each image, the class and encoded box (cx, cy, w, h as fractions of the
output image, see geometry.py) of its largest object after the image mode.

Multi-object task (YOLO-like grid of S x S cells): the cell hosting an object's centre is
responsible for it; its box is stored as the centre relative to that cell (cx*S - j, cy*S - i)
and the width/height relative to the image. With A anchor boxes (grid.anchors) each cell has A
slots and an object goes to the slot of its best-IoU anchor (anchors.py), so two objects collide
only when they share a cell and a best anchor.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import pandas as pd
import torch

from pipeline_lib.boxes.geometry import (
    ImageSpec,
    decode_boxes,
    encode_boxes,
    largest_box,
    mirror_encoded,
    output_size,
    pixel_fraction,
    transform_boxes,
)
from pipeline_lib.boxes.gridcoding import GridEncoding, encode_grid, encode_grid_yolo
from pipeline_lib.data.tables import Prepared
from pipeline_lib.measures.metrics import OVERLAP_OF_SOURCE
from pipeline_lib.models.modelcard import GridSpec, ModelCard

BOX_COLUMNS = ["xmin", "ymin", "xmax", "ymax"]
# One image's objects after the image mode: (fraction boxes (K, 4) float64 cx cy w h, labels (K,))
Objects = tuple[torch.Tensor, torch.Tensor]


@dataclass
class SingleTargets:
    """Targets for the rows of a feature file (same order as its image ids).

    boxes: (N, 4) float32 encoded, labels: (N,) int64, present: (N,) bool -- False where the image
    has no object left after the image mode (no object at all, or `crop` cut them all away); those
    rows hold zeros and must be left out of training and evaluation.
    """

    boxes: torch.Tensor
    labels: torch.Tensor
    present: torch.Tensor


def image_boxes(
    objects: pd.DataFrame, width: int, height: int, spec: ImageSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's objects -> (boxes (K, 4) encoded in the output image, class ids (K,) int64).

    Objects that the image mode drops (crop) are left out.
    """
    boxes = torch.tensor(objects[BOX_COLUMNS].to_numpy(), dtype=torch.float64).reshape(-1, 4)
    labels = torch.tensor(objects["class_id"].to_numpy(), dtype=torch.int64).reshape(-1)
    boxes, keep = transform_boxes(boxes, width, height, spec.mode, spec.size)
    out_width, out_height = output_size(width, height, spec.mode, spec.size)
    return encode_boxes(boxes, out_width, out_height), labels[keep]


def encoded_objects(
    images: pd.DataFrame,
    objects: pd.DataFrame,
    image_ids: list[str],
    spec: ImageSpec,
    mirrored: bool = False,
    inclusive: bool = True,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(row, encoded boxes, class ids) per image of `image_ids` that has objects in the tables,
    as `image_boxes` gives them (possibly none left after crop); with `mirrored`, as they are in
    the output image flipped left to right (the flipped features of backbone.hflip), the boxes
    being 1-based inclusive pixel indices (`inclusive`: VOC's, see `inclusive_pixels`) or
    continuous coordinates (COCO's)."""
    sizes = images.set_index("image_id")[["width", "height"]]
    by_image = dict(tuple(objects.groupby("image_id", sort=False)))
    for row, image_id in enumerate(image_ids):
        if image_id in by_image:
            width, height = (int(v) for v in sizes.loc[image_id])
            encoded, labels = image_boxes(by_image[image_id], width, height, spec)
            if mirrored:
                pixel = pixel_fraction(width, spec.mode, spec.size) if inclusive else 0.0
                encoded = mirror_encoded(encoded, pixel)
            yield row, encoded, labels


def inclusive_pixels(prepared: Prepared) -> bool:
    """Whether the prepared boxes are 1-based inclusive pixel indices (VOC's and the synthetic
    set's, as the devkit reads them) rather than continuous coordinates (COCO's)."""
    return OVERLAP_OF_SOURCE[prepared.info["source"]] == "voc_inclusive_pixels"


def image_objects(
    prepared: Prepared, image_ids: list[str], spec: ImageSpec, mirrored: bool = False
) -> list[Objects]:
    """The `Objects` of every image of `image_ids` (none for an image without any), as
    `encoded_objects` gives them: what every multi-object head kind makes its targets from."""
    none = (torch.zeros(0, 4, dtype=torch.float64), torch.zeros(0, dtype=torch.int64))
    found = [none] * len(image_ids)
    inclusive = inclusive_pixels(prepared)
    for row, fractions, labels in encoded_objects(
        prepared.images, prepared.objects, image_ids, spec, mirrored, inclusive
    ):
        found[row] = (fractions.double(), labels)
    return found


def single_object_targets(
    images: pd.DataFrame,
    objects: pd.DataFrame,
    image_ids: list[str],
    spec: ImageSpec,
    mirrored: bool = False,
    inclusive: bool = True,
) -> SingleTargets:
    """The largest object of each image in `image_ids` (rows of the prepared tables); `mirrored`:
    in the images flipped left to right (`encoded_objects`, with `inclusive`)."""
    n = len(image_ids)
    boxes = torch.zeros(n, 4, dtype=torch.float32)
    labels = torch.zeros(n, dtype=torch.int64)
    present = torch.zeros(n, dtype=torch.bool)
    found = encoded_objects(images, objects, image_ids, spec, mirrored, inclusive)
    for row, encoded, classes in found:
        if len(encoded):
            k = largest_box(encoded)
            boxes[row], labels[row], present[row] = encoded[k].float(), classes[k], True
    return SingleTargets(boxes, labels, present)


@dataclass
class GridTargets:
    """Grid targets for the rows of a feature file, S = num_cells (see gridcoding.py).

    boxes: (N, 4, S, S) float32 cell boxes; has_obj: (N, S, S) uint8; labels: (N, S, S) int64;
    objects: (N,) objects per image after the image mode; dropped: (N,) of those, how many lost
    their cell to a later object (collisions). With A anchors, boxes are (N, A, 4, S, S) and
    has_obj, labels (N, A, S, S).
    """

    boxes: torch.Tensor
    has_obj: torch.Tensor
    labels: torch.Tensor
    objects: torch.Tensor
    dropped: torch.Tensor


@dataclass(frozen=True)
class GridLevel:
    """One level of the grid head: S x S cells, its (A, 2) anchors (or None), the object
    scales sqrt(w * h) (image fractions) in [low, high) it learns (None: every object), which
    cells learn an object (grid.assign): `centre`, the one hosting its centre, or `neighbours`,
    that one and its two nearest neighbours, and which anchor slots: the best anchor's
    (`anchor_ratio` None, the lab's head) or every anchor within `anchor_ratio` of the object's
    shape (the conv heads, YOLOv5's rule). `encode` makes one image's targets by these rules."""

    num_cells: int
    anchors: torch.Tensor | None = None
    scales: tuple[float, float] | None = None
    assign: str = "centre"
    anchor_ratio: float | None = None

    def select(
        self, fractions: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The (K, 4) fraction boxes and labels of the objects whose scale this level learns."""
        if self.scales is None:
            return fractions, labels
        scale = (fractions[:, 2] * fractions[:, 3]).sqrt()
        mine = (scale >= self.scales[0]) & (scale < self.scales[1])
        return fractions[mine], labels[mine]

    def encode(self, fractions: torch.Tensor, labels: torch.Tensor) -> GridEncoding:
        """One image's targets on this level from the objects it learns (`select`)."""
        s, anchors = self.num_cells, self.anchors
        if self.assign == "neighbours" or self.anchor_ratio is not None:
            ratio = self.anchor_ratio or 0.0  # unused without anchors
            return encode_grid_yolo(
                fractions, labels, s, anchors, ratio, self.assign == "neighbours"
            )
        return encode_grid(fractions, labels, s, anchors)


def targets_to_grid_cell_tensor(objects: list[dict], num_cells: int):
    """The lab's interface: objects as [{'bndbox': {'cx', 'cy', 'width', 'height'}, 'class'}]
    (fractions of the image) -> (bboxes (4, S, S) float32, has_obj (S, S) uint8, labels (S, S)
    int32)."""
    fractions = torch.tensor(
        [[o["bndbox"][k] for k in ("cx", "cy", "width", "height")] for o in objects],
        dtype=torch.float64,
    ).reshape(-1, 4)
    labels = torch.tensor([o["class"] for o in objects], dtype=torch.int64)
    grid = encode_grid(fractions, labels, num_cells)
    return grid.boxes, grid.has_obj, grid.labels.to(torch.int32)


def multi_object_targets(
    images: pd.DataFrame,
    objects: pd.DataFrame,
    image_ids: list[str],
    spec: ImageSpec,
    level: GridLevel,
    mirrored: bool = False,
    inclusive: bool = True,
) -> GridTargets:
    """Grid targets of every image in `image_ids` (rows of the prepared tables) on one grid
    `level`: only the objects of the level's scales are targets there, and counted. `mirrored`:
    in the images flipped left to right (`encoded_objects`, with `inclusive`)."""
    n, s, anchors = len(image_ids), level.num_cells, level.anchors
    slots = () if anchors is None else (len(anchors),)
    out = GridTargets(
        boxes=torch.zeros(n, *slots, 4, s, s),
        has_obj=torch.zeros(n, *slots, s, s, dtype=torch.uint8),
        labels=torch.zeros(n, *slots, s, s, dtype=torch.int64),
        objects=torch.zeros(n, dtype=torch.int64),
        dropped=torch.zeros(n, dtype=torch.int64),
    )
    found = encoded_objects(images, objects, image_ids, spec, mirrored, inclusive)
    for row, fractions, classes in found:
        fractions, classes = level.select(fractions, classes)
        grid = level.encode(fractions, classes)
        out.boxes[row], out.has_obj[row], out.labels[row] = grid.boxes, grid.has_obj, grid.labels
        out.objects[row], out.dropped[row] = len(fractions), grid.dropped
    return out


def grid_levels(
    num_cells: int,
    fine_below: float | None = None,
    anchors: torch.Tensor | None = None,
    assign: str = "centre",
    anchor_ratio: float | None = None,
) -> list[GridLevel]:
    """The levels of the grid head: one S x S level learning every object (with `anchors` if
    given), or with `fine_below` (a two-level head, no anchors) the S x S level for objects
    whose sqrt(w * h) is at least `fine_below` of the image and a 2S x 2S level for the smaller
    ones. `assign` and `anchor_ratio` (see GridLevel) apply to every level."""
    if fine_below is None:
        return [GridLevel(num_cells, anchors, None, assign, anchor_ratio)]
    return [
        GridLevel(num_cells, None, (fine_below, math.inf), assign),
        GridLevel(2 * num_cells, None, (0.0, fine_below), assign),
    ]


def card_levels(grid: GridSpec) -> list[GridLevel]:
    """The levels a grid head's card describes (`grid_levels` of its GridSpec)."""
    anchors = torch.tensor(grid.anchors, dtype=torch.float32) if grid.anchors else None
    return grid_levels(grid.num_cells, grid.fine_below, anchors, grid.assign, grid.anchor_ratio)


def grid_targets(card: ModelCard, objects: list[Objects]) -> tuple[torch.Tensor, ...]:
    """The grid heads' targets of N images: (boxes (N, 4, S, S) float32, has_obj (N, S, S)
    uint8, labels (N, S, S) int64) of each level of the card's grid, in the order of its outputs
    (with A anchors (N, A, 4, S, S), (N, A, S, S)); as `multi_object_targets` makes them."""
    targets: list[torch.Tensor] = []
    for level in card_levels(card.grid):
        encoded = [level.encode(*level.select(fractions, labels)) for fractions, labels in objects]
        targets += [
            torch.stack([e.boxes for e in encoded]).float(),
            torch.stack([e.has_obj for e in encoded]).to(torch.uint8),
            torch.stack([e.labels for e in encoded]).long(),
        ]
    return tuple(targets)


def box_targets(card: ModelCard, objects: list[Objects]) -> tuple[torch.Tensor, torch.Tensor]:
    """The targets of the heads that match boxes themselves (FCOS, RetinaNet) for N images:
    (boxes (N, M, 4) float32 xyxy pixels of the S x S image, labels (N, M) int64), M the most
    objects of an image, padding labelled -1."""
    size = card.image.size
    most = max([len(labels) for _, labels in objects], default=0)
    boxes = torch.zeros(len(objects), most, 4)
    labels = torch.full((len(objects), most), -1, dtype=torch.int64)
    for n, (fractions, classes) in enumerate(objects):
        boxes[n, : len(classes)] = decode_boxes(fractions, size, size).float()
        labels[n, : len(classes)] = classes
    return boxes, labels


def image_targets(boxes: torch.Tensor, labels: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """`box_targets`' padded (B, M, 4) boxes and (B, M) labels -> torchvision's detection
    targets, one dict of "boxes" (G, 4) and "labels" (G,) per image."""
    present = labels >= 0
    return [{"boxes": b[p], "labels": k[p]} for b, k, p in zip(boxes, labels, present, strict=True)]


def training_shapes(
    images: pd.DataFrame, objects: pd.DataFrame, image_ids: list[str], spec: ImageSpec
) -> torch.Tensor:
    """(K, 2) float64 (w, h) of every object of `image_ids` after the image mode, as fractions of
    the output image (zero-width or zero-height boxes left out): what anchor priors are fitted to.
    """
    found = encoded_objects(images, objects, image_ids, spec)
    shapes = torch.cat(
        [torch.zeros(0, 2, dtype=torch.float64)]
        + [encoded[:, 2:].double() for _, encoded, _ in found]
    )
    return shapes[(shapes > 0).all(dim=1)]


def ground_truth(
    objects: pd.DataFrame, image_ids: list[str]
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per image of `image_ids`, all its objects in its original pixels, as the mAP expects them
    (metrics.voc_average_precision): (boxes (G, 4) float64 xyxy, labels (G,) int64, difficult
    (G,) bool)."""
    by_image = dict(tuple(objects.groupby("image_id", sort=False)))
    empty = objects.iloc[:0]
    truth = []
    for image_id in image_ids:
        mine = by_image.get(image_id, empty)
        truth.append(
            (
                torch.tensor(mine[BOX_COLUMNS].to_numpy(), dtype=torch.float64).reshape(-1, 4),
                torch.tensor(mine["class_id"].to_numpy(), dtype=torch.int64),
                torch.tensor(mine["difficult"].to_numpy(), dtype=torch.bool),
            )
        )
    return truth
