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

from functools import partial

import torch
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.retinanet import RetinaNet
from torchvision.models.detection.retinanet import RetinaNetHead as TorchvisionRetinaNetHead
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from pipeline_lib.base.params import HeadParams
from pipeline_lib.models.targets import image_targets
from pipeline_lib.models.torchvision_heads import (
    Placeholder,
    RecordsMatching,
    TorchvisionHead,
    builder,
    matched_measures,
)

Outputs = tuple[torch.Tensor, torch.Tensor]  # as RetinaNetHead names them:
OUTPUT_NAMES = ("cls_logits", "bbox_regression")
SCALES = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))
RATIOS = (0.5, 1.0, 2.0)


class _RecordingHead(RecordsMatching, TorchvisionRetinaNetHead):
    """RetinaNetHead, keeping its last matching (for the measures)."""


class RetinaNetHead(TorchvisionHead):
    """Packed cached features (backbones.pack_levels, or one level) -> RetinaNet's outputs on
    every anchor of every level: (class logits (B, L, K), box deltas (B, L, 4)), the levels
    concatenated from the finest (the fine one, the main one, P6, P7). `image_size`: S, the side
    of the image the features came from; `width`: the pyramid's channels (a multiple of 32, for
    GroupNorm); `depth`: 3x3 convolutions per tower (torchvision's has 4).
    """

    output_names = OUTPUT_NAMES
    slots = len(SCALES) * len(RATIOS)

    def __init__(
        self,
        feature_shape: tuple[int, int, int],
        n_classes: int,
        image_size: int,
        fine_channels: int = 0,
        width: int = 128,
        depth: int = 4,
    ):
        super().__init__(feature_shape, n_classes, image_size, fine_channels)
        for _ in range(2):  # P6, P7: 3x3 convolutions of stride 2 (padding 1)
            h, w = self.grids[-1]
            self.grids.append(((h + 1) // 2, (w + 1) // 2))
        self.neck = FeaturePyramidNetwork(self.inputs, width, LastLevelP6P7(width, width))
        norm = partial(nn.GroupNorm, 32)
        self.head = _RecordingHead(width, self.slots, n_classes, norm_layer=norm)
        for tower in (self.head.classification_head, self.head.regression_head):
            tower.conv = tower.conv[:depth]
        self.head.regression_head._loss_type = "giou"  # torchvision's v2 recipe
        strides = [image_size // h for h, _ in self.grids]
        sizes = tuple(tuple(round(4 * s * k) for k in SCALES) for s in strides)
        generator = AnchorGenerator(sizes, (RATIOS,) * len(strides))
        self._model = (
            RetinaNet(Placeholder(width), n_classes, anchor_generator=generator, head=self.head),
        )

    def loss(self, outputs: Outputs, targets: tuple[torch.Tensor, torch.Tensor]) -> dict:
        """RetinaNet's losses of a batch: `targets` (boxes (B, M, 4) xyxy pixels of the S x S
        image, labels (B, M), -1 for padding). "loss" is their sum; box_loss (GIoU), class_loss
        (focal) as the grid heads name their parts; obj_loss 0 (no objectness)."""
        anchors = self.anchors(len(outputs[0]), outputs[0].device)
        head_outputs = dict(zip(OUTPUT_NAMES, outputs, strict=True))
        parts = self.model.compute_loss(image_targets(*targets), head_outputs, anchors)
        box, cls = parts["bbox_regression"], parts["classification"]
        return {"loss": box + cls, "box_loss": box, "class_loss": cls, "obj_loss": box * 0}

    def measures(self, outputs: Outputs, targets: tuple[torch.Tensor, torch.Tensor]) -> dict:
        """`torchvision_heads.matched_measures`, an anchor found where its best class's sigmoid
        > 0.5."""
        cls_logits, regression = outputs
        anchors = torch.stack(self.anchors(len(cls_logits), cls_logits.device))
        coder = self.head.regression_head.box_coder

        def decode(fg: torch.Tensor) -> torch.Tensor:
            return coder.decode_single(regression[fg], anchors[fg])

        found = cls_logits.max(dim=-1).values > 0
        return matched_measures(self, cls_logits, decode, found, targets)


def retinanet_entry(hp: HeadParams) -> dict:
    """The card's description of a RetinaNet head: its pyramid's channels and towers' depth."""
    return {"kind": "retinanet", "width": hp.tower_width, "depth": hp.tower_depth}


build_retinanet = builder(RetinaNetHead)
