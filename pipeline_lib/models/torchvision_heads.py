"""What the heads running one of torchvision's detectors on the cached levels share (fcos.py,
retinanet.py): the levels fed to their feature pyramid, their anchors, what their matching can
learn, and their decoding brought to the original photo's pixels.

A subclass builds, in this order, `neck` (torchvision's `FeaturePyramidNetwork` over `inputs`),
`head` (the detector's head, recording its last matching in `head.matched`) and `_model` (a
one-tuple holding torchvision's detector with that head and an anchor generator for `grids`: not a
submodule, so the state dict holds the weights once), and gives `loss` and `measures`.

Boxes: pixels of the S x S image the features came from (xyxy); the targets are
`targets.box_targets`, padded with label -1.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou

from pipeline_lib.boxes.detection import Detections, Filtering, pixel_detections
from pipeline_lib.boxes.geometry import ImageSpec
from pipeline_lib.data.tables import Prepared
from pipeline_lib.features.backbones import unpack_levels
from pipeline_lib.models.losses import LossWeights, Objective
from pipeline_lib.models.modelcard import ModelCard
from pipeline_lib.models.targets import box_targets, image_objects

# the last dimension of each output torchvision's detectors name, per location (and anchor)
MATCHING_BATCH = 64  # images per loss call when counting matched objects
OUTPUT_SIZES = {"cls_logits": None, "bbox_regression": 4, "bbox_ctrness": 1}  # None: classes


class RecordsMatching:
    """Mixed into a torchvision detection head (`class H(RecordsMatching, FCOSHead)`): it keeps
    the last matching of locations to targets its loss was given, for the measures."""

    matched: list[torch.Tensor] | None = None

    def compute_loss(self, targets, head_outputs, anchors, matched_idxs):
        self.matched = matched_idxs
        return super().compute_loss(targets, head_outputs, anchors, matched_idxs)


class TorchvisionHead(nn.Module):
    """Packed cached features (backbones.pack_levels, or one level) -> the detector's outputs on
    every location (and anchor) of every level, the levels concatenated from the finest.

    `image_size`: S, the side of the image the features came from. The fine level, an inner
    block's raw residual stream, goes through a BatchNorm first; `grids` lists the levels'
    (h, w), the fine one first (a subclass appends the levels its pyramid adds).
    """

    output_names: tuple[str, ...]
    slots = 1  # anchors per location

    def __init__(
        self, feature_shape: tuple[int, int, int], n_classes: int, image_size: int, fine: int
    ):
        super().__init__()
        channels, height, width = feature_shape
        self.fine_channels, self.image_size, self.n_classes = fine, image_size, n_classes
        self.inputs = [fine] * bool(fine) + [channels - 4 * fine]  # the pyramid's inputs
        self.grids = [(height, width)]
        if fine:
            self.fine_norm = nn.BatchNorm2d(fine)
            self.grids.insert(0, (2 * height, 2 * width))

    @property
    def model(self) -> nn.Module:
        """torchvision's detector: its matching, loss and decoding."""
        return self._model[0]

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.fine_channels:
            main, fine = unpack_levels(features, self.fine_channels)
            levels = [self.fine_norm(fine), main]
        else:
            levels = [features]
        maps = list(self.neck(OrderedDict((str(k), x) for k, x in enumerate(levels))).values())
        out = self.head(maps)
        return tuple(out[name] for name in self.output_names)

    def per_level(self) -> list[int]:
        """The outputs of each level, per image: locations x anchors."""
        return [h * w * self.slots for h, w in self.grids]

    def anchors(self, batch: int, device: torch.device) -> list[torch.Tensor]:
        """The detector's anchors (FCOS: its locations) per image: (L, 4) xyxy pixel boxes of
        the S x S image."""
        s = self.image_size
        maps = [torch.empty(0, 0, h, w, device=device) for h, w in self.grids]
        images = ImageList(torch.empty(0, 0, s, s, device=device), [(s, s)] * batch)
        return self.model.anchor_generator(images, maps)

    def objective(self, weights: LossWeights) -> Objective:
        """The detector's own loss and measures (`loss`, `measures`) of its outputs against
        `targets.box_targets`; its parts are summed as torchvision sums them (`weights` do not
        apply)."""
        return Objective(self.loss, self.measures)

    @torch.no_grad()
    def matched_objects(self, boxes: torch.Tensor, labels: torch.Tensor) -> int:
        """How many of the objects in padded targets (as `loss` takes them) the detector's
        matching gives at least one location: the others cannot be learned. Images go through
        the loss `MATCHING_BATCH` at a time (its zero outputs for every image at once would take
        N x L x K floats)."""
        total = sum(self.per_level())
        sizes = [OUTPUT_SIZES[name] or self.n_classes for name in self.output_names]
        matched = 0
        for start in range(0, len(labels), MATCHING_BATCH):
            part = slice(start, start + MATCHING_BATCH)
            n = len(labels[part])
            self.loss(
                tuple(torch.zeros(n, total, size) for size in sizes), (boxes[part], labels[part])
            )
            matched += sum(len(m[m >= 0].unique()) for m in self.head.matched)
        return matched

    def learnable_objects(self, card: ModelCard, prepared: Prepared, ids: list[str]) -> int:
        """How many objects of images `ids` the detector's matching gives a location."""
        return self.matched_objects(*box_targets(card, image_objects(prepared, ids, card.image)))

    def detections(
        self,
        outputs: tuple[torch.Tensor, ...],
        sizes: list[tuple[int, int]],
        spec: ImageSpec,
        keep: Filtering,
    ) -> list[Detections]:
        """The detector's decoding (its scores from keep.score_threshold, per-class NMS at
        keep.nms_iou, keep.max_detections best) of B images whose original (width, height) are
        `sizes`, back to their own pixels."""
        model, s, per_level = self.model, self.image_size, self.per_level()
        model.score_thresh, model.detections_per_img = keep.score_threshold, keep.max_detections
        model.nms_thresh = 1.0 if keep.nms_iou is None else keep.nms_iou  # 1.0: nothing removed
        split = {
            name: list(t.split(per_level, dim=1))
            for name, t in zip(self.output_names, outputs, strict=True)
        }
        anchors = [list(a.split(per_level)) for a in self.anchors(len(sizes), outputs[0].device)]
        found = model.postprocess_detections(split, anchors, [(s, s)] * len(sizes))
        return pixel_detections(found, sizes, spec)


class Placeholder(nn.Module):
    """torchvision's detectors ask for a backbone with `out_channels`; the features are cached,
    so none runs."""

    def __init__(self, out_channels: int):
        super().__init__()
        self.out_channels = out_channels


def builder(kind: type[TorchvisionHead]) -> Callable[[ModelCard], nn.Module]:
    """A card -> a head of class `kind` (its entry's width and depth, the card's levels)."""

    def build(card: ModelCard) -> nn.Module:
        config = {k: v for k, v in card.head.items() if k != "kind"}
        shape, n_classes = tuple(card.feature_shape), len(card.classes)
        return kind(shape, n_classes, card.image.size, card.grid.fine_channels, **config)

    return build


def matched_measures(
    head: TorchvisionHead,
    cls_logits: torch.Tensor,
    decode: Callable[[torch.Tensor], torch.Tensor],
    found: torch.Tensor,
    targets: tuple[torch.Tensor, torch.Tensor],
) -> dict[str, tuple[float, int]]:
    """(sum, count) over the locations the detector matched to an object in its last `loss`
    call (the same batch): class accuracy and IoU of the box `decode(matched)` gives (matched:
    (B, L) bool); over all locations: whether `found` ((B, L) bool) says matched or not
    (obj_accuracy)."""
    matched = torch.stack(head.head.matched)  # (B, L); -1 background, -2 ignored (RetinaNet)
    boxes, labels = targets
    fg = matched >= 0
    rows = torch.arange(len(matched), device=matched.device)[:, None].expand_as(matched)
    true_boxes, true_labels = boxes[rows[fg], matched[fg]], labels[rows[fg], matched[fg]]
    iou = box_iou(decode(fg).float(), true_boxes.float()).diagonal()
    n = int(fg.sum())
    return {
        "accuracy": (float((cls_logits[fg].argmax(dim=1) == true_labels).sum()), n),
        "iou": (float(iou.sum()), n),
        "obj_accuracy": (float((found == fg).sum()), fg.numel()),
    }
