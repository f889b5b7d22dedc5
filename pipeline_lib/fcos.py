"""torchvision's FCOS detector (Tian et al. 2019) on the cached features (head.grid_kind: fcos).

The best-kept library's head for exactly this job, beside ours: torchvision's feature pyramid
(`ops.FeaturePyramidNetwork`) merges the cached levels (the stride-16 map of backbone.fine_layer,
when there is one, and the last map), `FCOSHead` (GroupNorm towers of `depth` 3x3 convolutions,
per-class sigmoid logits, box distances, centerness) runs on each, and torchvision's own `FCOS`
code assigns the targets (centre sampling, a size range per level), computes the losses (focal,
GIoU, centerness) and decodes (scores sqrt(class x centerness), NMS per class). Nothing of it is
rewritten here: this module only feeds it our cached maps and boxes, and turns its detections into
ours (`detection.Detections`, in the original image's pixels).

Boxes: FCOS works in the pixels of the S x S image the features came from (xyxy); the targets of
an image are its boxes there (`targets.box_targets`, padded with label -1).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOS, FCOSHead
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import FeaturePyramidNetwork, box_iou

from pipeline_lib.backbones import unpack_levels
from pipeline_lib.detection import Detections, Filtering, pixel_detections
from pipeline_lib.geometry import ImageSpec
from pipeline_lib.losses import LossWeights
from pipeline_lib.modelcard import ModelCard
from pipeline_lib.params import HeadParams
from pipeline_lib.tables import Prepared
from pipeline_lib.targets import box_targets, image_objects, image_targets
from pipeline_lib.training import Objective

Outputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # as FCOSHead names them:
OUTPUT_NAMES = ("cls_logits", "bbox_regression", "bbox_ctrness")


class _RecordingHead(FCOSHead):
    """FCOSHead that keeps the last targets FCOS matched to each location (for the measures)."""

    matched: list[torch.Tensor] | None = None

    def compute_loss(self, targets, head_outputs, anchors, matched_idxs):
        self.matched = matched_idxs
        return super().compute_loss(targets, head_outputs, anchors, matched_idxs)


class FcosHead(nn.Module):
    """Packed cached features (backbones.pack_levels, or one level) -> FCOS's outputs on every
    location of every level: (class logits (B, L, K), box regression (B, L, 4), centerness logits
    (B, L, 1)), the levels concatenated from the finest. `image_size`: S, the side of the image
    the features came from; `width`, `depth`: the pyramid's channels and the towers' 3x3 layers.
    """

    def __init__(
        self,
        feature_shape: tuple[int, int, int],
        n_classes: int,
        image_size: int,
        fine_channels: int = 0,
        width: int = 128,
        depth: int = 4,
    ):
        super().__init__()
        channels, height, wide = feature_shape
        main = channels - 4 * fine_channels
        self.fine_channels, self.image_size, self.n_classes = fine_channels, image_size, n_classes
        self.grids = [(height, wide)]
        if fine_channels:  # the raw residual stream of an inner block: standardised first
            self.fine_norm = nn.BatchNorm2d(fine_channels)
            self.grids.insert(0, (2 * height, 2 * wide))
        self.neck = FeaturePyramidNetwork([fine_channels] * bool(fine_channels) + [main], width)
        self.head = _RecordingHead(width, 1, n_classes, depth)
        strides = [image_size // h for h, _ in self.grids]  # anchor size = stride (FCOS's)
        anchors = AnchorGenerator(tuple((s,) for s in strides), ((1.0,),) * len(strides))
        # torchvision's FCOS for its matching, loss and decoding; not a submodule (its head is
        # ours, its backbone a placeholder), so the state dict holds this module's weights once.
        self._fcos = (
            FCOS(_Placeholder(width), n_classes, anchor_generator=anchors, head=self.head),
        )

    @property
    def fcos(self) -> FCOS:
        return self._fcos[0]

    def forward(self, features: torch.Tensor) -> Outputs:
        if self.fine_channels:
            main, fine = unpack_levels(features, self.fine_channels)
            levels = [self.fine_norm(fine), main]
        else:
            levels = [features]
        maps = list(self.neck(OrderedDict((str(k), x) for k, x in enumerate(levels))).values())
        out = self.head(maps)
        return tuple(out[name] for name in OUTPUT_NAMES)

    def anchors(self, batch: int, device: torch.device) -> list[torch.Tensor]:
        """FCOS's locations: per image (L, 4) boxes of a stride's side around each cell's centre."""
        s = self.image_size
        maps = [torch.empty(0, 0, h, w, device=device) for h, w in self.grids]
        images = ImageList(torch.empty(0, 0, s, s, device=device), [(s, s)] * batch)
        return self.fcos.anchor_generator(images, maps)

    def loss(self, outputs: Outputs, targets: tuple[torch.Tensor, torch.Tensor]) -> dict:
        """FCOS's losses of a batch: `targets` (boxes (B, M, 4) xyxy pixels of the S x S image,
        labels (B, M), -1 for padding). "loss" is their sum; box_loss (GIoU), class_loss (focal),
        obj_loss (centerness BCE) as the grid heads name their parts."""
        anchors = self.anchors(len(outputs[0]), outputs[0].device)
        per_level = [h * w for h, w in self.grids]
        head_outputs = dict(zip(OUTPUT_NAMES, outputs, strict=True))
        parts = self.fcos.compute_loss(image_targets(*targets), head_outputs, anchors, per_level)
        box, cls, obj = parts["bbox_regression"], parts["classification"], parts["bbox_ctrness"]
        return {"loss": box + cls + obj, "box_loss": box, "class_loss": cls, "obj_loss": obj}

    def measures(self, outputs: Outputs, targets: tuple[torch.Tensor, torch.Tensor]) -> dict:
        """(sum, count) over the locations FCOS matched to an object in the last `loss` call (the
        same batch): class accuracy and IoU of the decoded box; over all locations: whether
        sigmoid(centerness) > 0.5 says matched or not (obj_accuracy)."""
        cls_logits, regression, ctrness = outputs
        anchors = torch.stack(self.anchors(len(cls_logits), cls_logits.device))
        matched = torch.stack(self.head.matched)  # (B, L), -1: background
        boxes, labels = targets
        fg = matched >= 0
        rows = torch.arange(len(matched), device=matched.device)[:, None].expand_as(matched)
        true_boxes, true_labels = boxes[rows[fg], matched[fg]], labels[rows[fg], matched[fg]]
        predicted = self.head.box_coder.decode(regression[fg], anchors[fg])
        iou = box_iou(predicted.float(), true_boxes.float()).diagonal()
        n = int(fg.sum())
        return {
            "accuracy": (float((cls_logits[fg].argmax(dim=1) == true_labels).sum()), n),
            "iou": (float(iou.sum()), n),
            "obj_accuracy": (float(((ctrness[..., 0] > 0) == fg).sum()), fg.numel()),
        }

    @torch.no_grad()
    def matched_objects(self, boxes: torch.Tensor, labels: torch.Tensor) -> int:
        """How many of the objects in padded targets (as `loss` takes them) FCOS's assignment
        gives at least one location: the others cannot be learned."""
        n, total = len(labels), sum(h * w for h, w in self.grids)
        shapes = ((n, total, self.n_classes), (n, total, 4), (n, total, 1))
        self.loss(tuple(torch.zeros(shape) for shape in shapes), (boxes, labels))
        return sum(len(m[m >= 0].unique()) for m in self.head.matched)

    def learnable_objects(self, card: ModelCard, prepared: Prepared, ids: list[str]) -> int:
        """How many objects of images `ids` FCOS's assignment gives a location (the others
        cannot be learned)."""
        return self.matched_objects(*box_targets(card, image_objects(prepared, ids, card.image)))

    def objective(self, weights: LossWeights) -> Objective:
        """FCOS's own loss and measures (`loss`, `measures`) of its outputs against
        `targets.box_targets`; its parts are summed as FCOS sums them (`weights` do not apply)."""
        return Objective(self.loss, self.measures)

    def detections(
        self, outputs: Outputs, sizes: list[tuple[int, int]], spec: ImageSpec, keep: Filtering
    ) -> list[Detections]:
        """FCOS's decoding (its score sqrt(sigmoid(class) x sigmoid(centerness)) from
        keep.score_threshold, per-class NMS at keep.nms_iou, keep.max_detections best) of B
        images whose original (width, height) are `sizes`, back to their own pixels."""
        fcos, s = self.fcos, self.image_size
        fcos.score_thresh, fcos.detections_per_img = keep.score_threshold, keep.max_detections
        fcos.nms_thresh = 1.0 if keep.nms_iou is None else keep.nms_iou  # 1.0: nothing removed
        per_level = [h * w for h, w in self.grids]
        split = {
            name: list(t.split(per_level, dim=1))
            for name, t in zip(OUTPUT_NAMES, outputs, strict=True)
        }
        anchors = [list(a.split(per_level)) for a in self.anchors(len(sizes), outputs[0].device)]
        found = fcos.postprocess_detections(split, anchors, [(s, s)] * len(sizes))
        return pixel_detections(found, sizes, spec)


class _Placeholder(nn.Module):
    """FCOS asks for a backbone with `out_channels`; the features are cached, so none runs."""

    def __init__(self, out_channels: int):
        super().__init__()
        self.out_channels = out_channels


def fcos_entry(hp: HeadParams) -> dict:
    """The card's description of an FCOS head: its pyramid's channels and towers' depth."""
    return {"kind": "fcos", "width": hp.conv_width, "depth": hp.conv_depth}


def build_fcos(card: ModelCard) -> nn.Module:
    config = {k: v for k, v in card.head.items() if k != "kind"}
    shape, n_classes = tuple(card.feature_shape), len(card.classes)
    return FcosHead(shape, n_classes, card.image.size, card.grid.fine_channels, **config)
