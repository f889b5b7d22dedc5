"""From grid head outputs to detections in the original image's pixels.

Score of a cell = sigmoid(objectness) x softmax class probability of its best class. Cells are
kept from `score_threshold`, then per-class non-maximum suppression (torchvision's batched_nms)
at `nms_iou`, then the `max_detections` best.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torchvision.ops import batched_nms

from pipeline_lib.geometry import encoded_to_image


@dataclass
class Detections:
    """One image's detections: boxes (D, 4) xyxy pixels, scores (D,), labels (D,) int64."""

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.scores)


def grid_to_encoded(pred_boxes: torch.Tensor) -> torch.Tensor:
    """(B, 4, S, S) cell-relative boxes -> (B, S*S, 4) encoded (cx, cy, w, h) image fractions,
    cells in row-major order (row i, column j). With anchors, (B, A, 4, S, S) -> (B, A*S*S, 4),
    anchor by anchor."""
    if pred_boxes.dim() == 5:
        return grid_to_encoded(pred_boxes.flatten(0, 1)).reshape(len(pred_boxes), -1, 4)
    b, _, s, _ = pred_boxes.shape
    i, j = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    cx = (pred_boxes[:, 0] + j) / s
    cy = (pred_boxes[:, 1] + i) / s
    return torch.stack([cx, cy, pred_boxes[:, 2], pred_boxes[:, 3]], dim=-1).reshape(b, s * s, 4)


def cell_scores(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, K + 1, S, S) logits -> (scores (B, S*S), labels (B, S*S)) of each cell's best class;
    with anchors, (B, A, K + 1, S, S) -> (B, A*S*S) in the order of `grid_to_encoded`."""
    if logits.dim() == 5:
        scores, labels = cell_scores(logits.flatten(0, 1))
        return scores.reshape(len(logits), -1), labels.reshape(len(logits), -1)
    b, k1, s, _ = logits.shape
    probs = torch.softmax(logits[:, :-1].float(), dim=1) * torch.sigmoid(logits[:, -1:].float())
    scores, labels = probs.reshape(b, k1 - 1, s * s).max(dim=1)
    return scores, labels


def decode_image(
    encoded: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    width: int,
    height: int,
    mode: str,
    size: int,
    score_threshold: float,
    nms_iou: float | None,
    max_detections: int,
) -> Detections:
    """One image's (S*S, 4) encoded boxes, scores and labels -> its detections in the original
    `width` x `height` image (no NMS when `nms_iou` is None)."""
    keep = scores >= score_threshold
    scores, labels = scores[keep], labels[keep]
    boxes = encoded_to_image(encoded[keep], width, height, mode, size)
    if nms_iou is not None:
        kept = batched_nms(boxes, scores.double(), labels, nms_iou)
    else:
        kept = torch.argsort(scores, descending=True, stable=True)
    kept = kept[:max_detections]
    return Detections(boxes[kept].float(), scores[kept], labels[kept])


def grid_detections(
    pred_boxes: torch.Tensor | Sequence[torch.Tensor],
    logits: torch.Tensor | Sequence[torch.Tensor],
    sizes: list[tuple[int, int]],
    mode: str,
    size: int,
    score_threshold: float,
    nms_iou: float | None,
    max_detections: int,
) -> list[Detections]:
    """Grid head outputs for B images -> each image's detections in its own pixels.

    pred_boxes (B, [A,] 4, S, S) and logits (B, [A,] K + 1, S, S) as `MultiObjectHead` returns
    them, or sequences of those, one per level of a two-level head: the levels' cells are
    merged before NMS. `sizes` are the B original (width, height); `mode` / `size` the image mode
    the features were made with.
    """
    if isinstance(pred_boxes, torch.Tensor):
        pred_boxes, logits = [pred_boxes], [logits]
    encoded = torch.cat([grid_to_encoded(level) for level in pred_boxes], dim=1)
    per_level = [cell_scores(level) for level in logits]
    scores = torch.cat([level_scores for level_scores, _ in per_level], dim=1)
    labels = torch.cat([level_labels for _, level_labels in per_level], dim=1)
    return [
        decode_image(encoded[n], scores[n], labels[n], width, height, mode, size,
                     score_threshold, nms_iou, max_detections)
        for n, (width, height) in enumerate(sizes)
    ]  # fmt: skip


def single_detections(
    pred_boxes: torch.Tensor,
    logits: torch.Tensor,
    sizes: list[tuple[int, int]],
    mode: str,
    size: int,
) -> list[Detections]:
    """Single-object head outputs for B images -> one detection each (its largest object, scored
    by the softmax probability of its class), in the image's own pixels.

    pred_boxes (B, 4) encoded, logits (B, K), `sizes` the B original (width, height).
    """
    scores, labels = torch.softmax(logits.float(), dim=1).max(dim=1)
    return [
        Detections(encoded_to_image(pred_boxes[n : n + 1], width, height, mode, size).float(),
                   scores[n : n + 1], labels[n : n + 1])
        for n, (width, height) in enumerate(sizes)
    ]  # fmt: skip
