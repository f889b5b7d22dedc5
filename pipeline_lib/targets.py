"""What the heads learn to predict, built from the prepared tables for the rows of a feature file.

Single-object task: for each image, the class and encoded box (cx, cy, w, h as fractions of the
output image, see geometry.py) of its largest object after the image mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from pipeline_lib.geometry import encode_boxes, largest_box, output_size, transform_boxes

BOX_COLUMNS = ["xmin", "ymin", "xmax", "ymax"]


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
    objects: pd.DataFrame, width: int, height: int, mode: str, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's objects -> (boxes (K, 4) encoded in the output image, class ids (K,) int64).

    Objects that the image mode drops (crop) are left out.
    """
    boxes = torch.tensor(objects[BOX_COLUMNS].to_numpy(), dtype=torch.float64).reshape(-1, 4)
    labels = torch.tensor(objects["class_id"].to_numpy(), dtype=torch.int64).reshape(-1)
    boxes, keep = transform_boxes(boxes, width, height, mode, size)
    out_width, out_height = output_size(width, height, mode, size)
    return encode_boxes(boxes, out_width, out_height), labels[keep]


def single_object_targets(
    images: pd.DataFrame, objects: pd.DataFrame, image_ids: list[str], mode: str, size: int
) -> SingleTargets:
    """The largest object of each image in `image_ids` (rows of the prepared tables)."""
    sizes = images.set_index("image_id")[["width", "height"]]
    by_image = dict(tuple(objects.groupby("image_id", sort=False)))
    n = len(image_ids)
    boxes = torch.zeros(n, 4, dtype=torch.float32)
    labels = torch.zeros(n, dtype=torch.int64)
    present = torch.zeros(n, dtype=torch.bool)
    for row, image_id in enumerate(image_ids):
        if image_id not in by_image:
            continue
        width, height = (int(v) for v in sizes.loc[image_id])
        encoded, classes = image_boxes(by_image[image_id], width, height, mode, size)
        if len(encoded):
            k = largest_box(encoded)
            boxes[row], labels[row], present[row] = encoded[k].float(), classes[k], True
    return SingleTargets(boxes, labels, present)
