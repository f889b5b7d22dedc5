"""From head outputs to detections in the original image's pixels.

Score of a cell = sigmoid(objectness) x softmax class probability of its best class. Cells are
kept from `score_threshold`, then per-class non-maximum suppression (torchvision's batched_nms)
at `nms_iou`, then the `max_detections` best. torchvision's detectors decode their own
(fcos.py, retinanet.py); `pixel_detections` brings theirs to the original pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torchvision.ops import batched_nms

from pipeline_lib.boxes.geometry import ImageSpec, encode_boxes, encoded_to_image
from pipeline_lib.boxes.gridcoding import decode_grid


@dataclass
class Detections:
    """One image's detections: boxes (D, 4) xyxy pixels, scores (D,), labels (D,) int64."""

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.scores)

    def as_tuple(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(boxes, scores, labels), as `metrics.voc_average_precision` takes them."""
        return self.boxes, self.scores, self.labels


@dataclass(frozen=True)
class Filtering:
    """Which cells become detections: those scoring `score_threshold` or more, then per-class
    NMS at `nms_iou` (None: none), then the `max_detections` best."""

    score_threshold: float = 0.2
    nms_iou: float | None = 0.5
    max_detections: int = 100


def cell_scores(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, K + 1, S, S) logits -> (scores (B, S*S), labels (B, S*S)) of each cell's best class;
    with anchors, (B, A, K + 1, S, S) -> (B, A*S*S) in the order of `gridcoding.decode_grid`."""
    if logits.dim() == 5:
        scores, labels = cell_scores(logits.flatten(0, 1))
        return scores.reshape(len(logits), -1), labels.reshape(len(logits), -1)
    b, k1, s, _ = logits.shape
    probs = torch.softmax(logits[:, :-1].float(), dim=1) * torch.sigmoid(logits[:, -1:].float())
    scores, labels = probs.reshape(b, k1 - 1, s * s).max(dim=1)
    return scores, labels


def decode_image(
    fractions: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    image_size: tuple[int, int],
    spec: ImageSpec,
    keep: Filtering,
) -> Detections:
    """One image's (S*S, 4) fraction boxes, scores and labels -> its detections in the original
    image of `image_size` (width, height), which went through `spec` to the backbone."""
    chosen = scores >= keep.score_threshold
    scores, labels = scores[chosen], labels[chosen]
    boxes = encoded_to_image(fractions[chosen], *image_size, spec.mode, spec.size)
    if keep.nms_iou is not None:
        kept = batched_nms(boxes, scores.double(), labels, keep.nms_iou)
    else:
        kept = torch.argsort(scores, descending=True, stable=True)
    kept = kept[: keep.max_detections]
    return Detections(boxes[kept].float(), scores[kept], labels[kept])


def grid_detections(
    pred_boxes: torch.Tensor | Sequence[torch.Tensor],
    logits: torch.Tensor | Sequence[torch.Tensor],
    sizes: list[tuple[int, int]],
    spec: ImageSpec,
    keep: Filtering,
) -> list[Detections]:
    """Grid head outputs for B images -> each image's detections in its own pixels.

    pred_boxes (B, [A,] 4, S, S) cell boxes and logits (B, [A,] K + 1, S, S) as
    `MlpGridHead` returns them, or sequences of those, one per level of a two-level head:
    the levels' cells are merged before NMS. `sizes` are the B original (width, height); `spec`
    the image mode the features were made with.
    """
    if isinstance(pred_boxes, torch.Tensor):
        pred_boxes, logits = [pred_boxes], [logits]
    fractions = torch.cat([decode_grid(level) for level in pred_boxes], dim=1)
    per_level = [cell_scores(level) for level in logits]
    scores = torch.cat([level_scores for level_scores, _ in per_level], dim=1)
    labels = torch.cat([level_labels for _, level_labels in per_level], dim=1)
    return [
        decode_image(fractions[n], scores[n], labels[n], image_size, spec, keep)
        for n, image_size in enumerate(sizes)
    ]


def single_detections(
    pred_boxes: torch.Tensor, logits: torch.Tensor, sizes: list[tuple[int, int]], spec: ImageSpec
) -> list[Detections]:
    """Single-object head outputs for B images -> one detection each (its largest object, scored
    by the softmax probability of its class), in the image's own pixels.

    pred_boxes (B, 4) fraction boxes, logits (B, K), `sizes` the B original (width, height).
    """
    scores, labels = torch.softmax(logits.float(), dim=1).max(dim=1)
    return [
        Detections(
            encoded_to_image(pred_boxes[n : n + 1], width, height, spec.mode, spec.size).float(),
            scores[n : n + 1],
            labels[n : n + 1],
        )
        for n, (width, height) in enumerate(sizes)
    ]


def pixel_detections(
    found: list[dict[str, torch.Tensor]], sizes: list[tuple[int, int]], spec: ImageSpec
) -> list[Detections]:
    """torchvision's detections of B images (per image "boxes" (D, 4) xyxy in the pixels of the
    S x S image after the image mode, "scores", "labels") -> ours, in the pixels of the originals
    whose (width, height) are `sizes`."""
    results = []
    for image, (width, height) in zip(found, sizes, strict=True):
        fractions = encode_boxes(image["boxes"].double(), spec.size, spec.size)
        boxes = encoded_to_image(fractions, width, height, spec.mode, spec.size)
        results.append(Detections(boxes.float(), image["scores"], image["labels"]))
    return results
