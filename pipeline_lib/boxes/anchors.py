"""Anchor boxes (priors) for the grid head: k box shapes per cell, as in YOLOv2.

An anchor is a (w, h) pair, fractions of the output image like the encoded boxes (see
geometry.py). Shapes are compared as if the boxes shared their centre, so the IoU of two shapes
is min(w) * min(h) / (w1 h1 + w2 h2 - min(w) * min(h)).

The default priors come from k-means on the training boxes with the distance 1 - IoU (YOLOv2,
Redmon & Farhadi 2016): unlike Euclidean k-means on (w, h), large boxes do not dominate.
"""

from __future__ import annotations

import torch
from torchvision.ops import box_iou


def shape_iou(wh1: torch.Tensor, wh2: torch.Tensor) -> torch.Tensor:
    """(N, M) IoU of (N, 2) and (M, 2) box shapes (w, h) placed on a common centre."""

    def corners(wh: torch.Tensor) -> torch.Tensor:  # on a common corner: the same IoU
        wh = wh.double()
        return torch.cat([torch.zeros_like(wh), wh], dim=1)

    return box_iou(corners(wh1), corners(wh2))


def best_anchor(wh: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """(N,) int64 index of the anchor of (A, 2) `anchors` whose shape best overlaps each of the
    (N, 2) shapes `wh` (the first one on ties)."""
    return shape_iou(wh, anchors).argmax(dim=1)


def anchor_matches(wh: torch.Tensor, anchors: torch.Tensor, ratio: float) -> torch.Tensor:
    """(N, A) bool: which of the (A, 2) `anchors` each of the (N, 2) shapes `wh` goes to, by
    YOLOv5's rule: an anchor whose width and height are both within `ratio` times the shape's
    (max(w / aw, aw / w, h / ah, ah / h) < ratio; YOLOv5's anchor_t is 4), and the best-IoU anchor
    (`best_anchor`) whatever the ratio, so that no shape is left without one."""
    scale = wh.double()[:, None, :] / anchors.double()[None, :, :]
    fits = torch.maximum(scale, 1 / scale).amax(dim=2) < ratio
    fits[torch.arange(len(wh), device=wh.device), best_anchor(wh, anchors)] = True
    return fits


def kmeans_anchors(
    wh: torch.Tensor, k: int, max_iterations: int = 300
) -> tuple[torch.Tensor, float]:
    """k-means with distance 1 - IoU on (N, 2) box shapes -> ((k, 2) float64 anchors sorted by
    area, mean IoU of each shape with its best anchor).

    Deterministic: the centres start at the shapes of rank (i + 0.5) N / k by area, and each update
    takes the mean shape of a cluster (a cluster left empty keeps its centre). Stops when no shape
    changes cluster. Needs at least k shapes.
    """
    wh = wh.double().reshape(-1, 2)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if len(wh) < k:
        raise ValueError(f"{len(wh)} boxes cannot make {k} anchors")
    if (wh <= 0).any():
        raise ValueError("box widths and heights must be positive")
    order = torch.argsort(wh.prod(dim=1), stable=True)
    ranks = ((torch.arange(k, device=wh.device) + 0.5) * len(wh) / k).long()
    centres = wh[order[ranks]].clone()
    assigned = torch.full((len(wh),), -1, dtype=torch.int64, device=wh.device)
    for _ in range(max_iterations):
        nearest = best_anchor(wh, centres)
        if torch.equal(nearest, assigned):
            break
        assigned = nearest
        for c in range(k):
            members = wh[assigned == c]
            if len(members):
                centres[c] = members.mean(dim=0)
    centres = centres[torch.argsort(centres.prod(dim=1), stable=True)]
    fitness = shape_iou(wh, centres).max(dim=1).values.mean().item()
    return centres, fitness
