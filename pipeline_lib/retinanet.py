"""torchvision's RetinaNet detector (Lin et al. 2017) on the cached features (head.grid_kind:
retinanet).

As fcos.py does for FCOS, this module only feeds torchvision's own code our cached maps and boxes:
its feature pyramid (`ops.FeaturePyramidNetwork`) merges the cached levels (the stride-16 map of
backbone.fine_layer, when there is one, and the last map) and adds P6 and P7 from the last one
(`LastLevelP6P7`: stride-2 convolutions, for the large objects), `RetinaNetHead` (GroupNorm towers
of `depth` 3x3 convolutions, per-class sigmoid logits, box deltas; the v2 recipe: GIoU box loss)
runs on each, and torchvision's `RetinaNet` matches anchors to boxes (IoU >= 0.5 foreground,
< 0.4 background, each box's best anchors kept), computes the losses (focal, GIoU) and decodes
(sigmoid scores, best 1000 per level, NMS per class). Anchors: 9 per location, sides 4 strides x
2^(0, 1/3, 2/3) at ratios 1:2, 1:1, 2:1 (torchvision's).

Boxes: pixels of the S x S image the features came from (xyxy); targets are
`targets.box_targets`, padded with label -1.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import partial

import torch
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNet
from torchvision.models.detection.retinanet import RetinaNetHead as TorchvisionRetinaNetHead
from torchvision.ops import FeaturePyramidNetwork, box_iou
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from pipeline_lib.backbones import unpack_levels
from pipeline_lib.detection import Detections, Filtering, pixel_detections
from pipeline_lib.geometry import ImageSpec
from pipeline_lib.losses import LossWeights
from pipeline_lib.modelcard import ModelCard
from pipeline_lib.params import HeadParams
from pipeline_lib.tables import Prepared
from pipeline_lib.targets import box_targets, image_objects, image_targets
from pipeline_lib.training import Objective

Outputs = tuple[torch.Tensor, torch.Tensor]  # as RetinaNetHead names them:
OUTPUT_NAMES = ("cls_logits", "bbox_regression")
SCALES = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))
RATIOS = (0.5, 1.0, 2.0)


class _RecordingHead(TorchvisionRetinaNetHead):
    """RetinaNetHead that keeps the last anchors-to-targets matching (for the measures)."""

    matched: list[torch.Tensor] | None = None

    def compute_loss(self, targets, head_outputs, anchors, matched_idxs):
        self.matched = matched_idxs
        return super().compute_loss(targets, head_outputs, anchors, matched_idxs)


class RetinaNetHead(nn.Module):
    """Packed cached features (backbones.pack_levels, or one level) -> RetinaNet's outputs on
    every anchor of every level: (class logits (B, L, K), box deltas (B, L, 4)), the levels
    concatenated from the finest (the fine one, the main one, P6, P7). `image_size`: S, the side
    of the image the features came from; `width`: the pyramid's channels (a multiple of 32, for
    GroupNorm); `depth`: 3x3 convolutions per tower (torchvision's has 4).
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
        for _ in range(2):  # P6, P7: 3x3 convolutions of stride 2 (padding 1)
            h, w = self.grids[-1]
            self.grids.append(((h + 1) // 2, (w + 1) // 2))
        inputs = [fine_channels] * bool(fine_channels) + [main]
        self.neck = FeaturePyramidNetwork(inputs, width, LastLevelP6P7(width, width))
        anchors = len(SCALES) * len(RATIOS)
        norm = partial(nn.GroupNorm, 32)
        self.head = _RecordingHead(width, anchors, n_classes, norm_layer=norm)
        for tower in (self.head.classification_head, self.head.regression_head):
            tower.conv = tower.conv[:depth]
        self.head.regression_head._loss_type = "giou"  # torchvision's v2 recipe
        strides = [image_size // h for h, _ in self.grids]
        sizes = tuple(tuple(round(4 * s * k) for k in SCALES) for s in strides)
        generator = AnchorGenerator(sizes, (RATIOS,) * len(strides))
        # torchvision's RetinaNet for its matching, loss and decoding; not a submodule (its head
        # is ours, its backbone a placeholder), so the state dict holds this module's weights.
        self._retinanet = (
            RetinaNet(_Placeholder(width), n_classes, anchor_generator=generator, head=self.head),
        )

    @property
    def retinanet(self) -> RetinaNet:
        return self._retinanet[0]

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
        """RetinaNet's anchors: per image (L, 4) xyxy boxes in the S x S image's pixels."""
        s = self.image_size
        maps = [torch.empty(0, 0, h, w, device=device) for h, w in self.grids]
        images = ImageList(torch.empty(0, 0, s, s, device=device), [(s, s)] * batch)
        return self.retinanet.anchor_generator(images, maps)

    def loss(self, outputs: Outputs, targets: tuple[torch.Tensor, torch.Tensor]) -> dict:
        """RetinaNet's losses of a batch: `targets` (boxes (B, M, 4) xyxy pixels of the S x S
        image, labels (B, M), -1 for padding). "loss" is their sum; box_loss (GIoU), class_loss
        (focal) as the grid heads name their parts; obj_loss 0 (no objectness)."""
        anchors = self.anchors(len(outputs[0]), outputs[0].device)
        head_outputs = dict(zip(OUTPUT_NAMES, outputs, strict=True))
        parts = self.retinanet.compute_loss(image_targets(*targets), head_outputs, anchors)
        box, cls = parts["bbox_regression"], parts["classification"]
        return {"loss": box + cls, "box_loss": box, "class_loss": cls, "obj_loss": box * 0}

    def measures(self, outputs: Outputs, targets: tuple[torch.Tensor, torch.Tensor]) -> dict:
        """(sum, count) over the anchors matched to an object in the last `loss` call (the same
        batch): class accuracy and IoU of the decoded box; over all anchors: whether the best
        class's sigmoid > 0.5 says matched or not (obj_accuracy)."""
        cls_logits, regression = outputs
        anchors = torch.stack(self.anchors(len(cls_logits), cls_logits.device))
        matched = torch.stack(self.head.matched)  # (B, L); -1 background, -2 ignored
        boxes, labels = targets
        fg = matched >= 0
        rows = torch.arange(len(matched), device=matched.device)[:, None].expand_as(matched)
        true_boxes, true_labels = boxes[rows[fg], matched[fg]], labels[rows[fg], matched[fg]]
        coder = self.head.regression_head.box_coder
        predicted = coder.decode_single(regression[fg], anchors[fg])
        iou = box_iou(predicted.float(), true_boxes.float()).diagonal()
        n = int(fg.sum())
        found = cls_logits.max(dim=-1).values > 0
        return {
            "accuracy": (float((cls_logits[fg].argmax(dim=1) == true_labels).sum()), n),
            "iou": (float(iou.sum()), n),
            "obj_accuracy": (float((found == fg).sum()), fg.numel()),
        }

    def objective(self, weights: LossWeights) -> Objective:
        """RetinaNet's own loss and measures (`loss`, `measures`) of its outputs against
        `targets.box_targets`; its parts are summed as RetinaNet sums them (`weights` do not
        apply)."""
        return Objective(self.loss, self.measures)

    @torch.no_grad()
    def matched_objects(self, boxes: torch.Tensor, labels: torch.Tensor) -> int:
        """How many of the objects in padded targets (as `loss` takes them) RetinaNet's matching
        gives at least one anchor (with its best-anchor rule: every box with an anchor)."""
        n, total = len(labels), self.anchors_per_image()
        shapes = ((n, total, self.n_classes), (n, total, 4))
        self.loss(tuple(torch.zeros(shape) for shape in shapes), (boxes, labels))
        return sum(len(m[m >= 0].unique()) for m in self.head.matched)

    def anchors_per_image(self) -> int:
        return sum(h * w for h, w in self.grids) * len(SCALES) * len(RATIOS)

    def learnable_objects(self, card: ModelCard, prepared: Prepared, ids: list[str]) -> int:
        """How many objects of images `ids` RetinaNet's matching gives an anchor."""
        return self.matched_objects(*box_targets(card, image_objects(prepared, ids, card.image)))

    def detections(
        self, outputs: Outputs, sizes: list[tuple[int, int]], spec: ImageSpec, keep: Filtering
    ) -> list[Detections]:
        """RetinaNet's decoding (sigmoid scores from keep.score_threshold, per-class NMS at
        keep.nms_iou, keep.max_detections best) of B images whose original (width, height) are
        `sizes`, back to their own pixels."""
        model, s = self.retinanet, self.image_size
        model.score_thresh, model.detections_per_img = keep.score_threshold, keep.max_detections
        model.nms_thresh = 1.0 if keep.nms_iou is None else keep.nms_iou  # 1.0: nothing removed
        slots = len(SCALES) * len(RATIOS)
        per_level = [h * w * slots for h, w in self.grids]
        split = {
            name: list(t.split(per_level, dim=1))
            for name, t in zip(OUTPUT_NAMES, outputs, strict=True)
        }
        anchors = [list(a.split(per_level)) for a in self.anchors(len(sizes), outputs[0].device)]
        found = model.postprocess_detections(split, anchors, [(s, s)] * len(sizes))
        return pixel_detections(found, sizes, spec)


class _Placeholder(nn.Module):
    """RetinaNet asks for a backbone with `out_channels`; the features are cached, none runs."""

    def __init__(self, out_channels: int):
        super().__init__()
        self.out_channels = out_channels


def retinanet_entry(hp: HeadParams) -> dict:
    """The card's description of a RetinaNet head: its pyramid's channels and towers' depth."""
    return {"kind": "retinanet", "width": hp.conv_width, "depth": hp.conv_depth}


def build_retinanet(card: ModelCard) -> nn.Module:
    config = {k: v for k, v in card.head.items() if k != "kind"}
    shape, n_classes = tuple(card.feature_shape), len(card.classes)
    return RetinaNetHead(shape, n_classes, card.image.size, card.grid.fine_channels, **config)
