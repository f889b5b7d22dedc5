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
an image are its boxes there (`targets.box_targets`, padded with label -1). Its locations are the
centres of the feature cells, (x + 1/2) stride, as the paper puts them (`CellCentres`); model files
written before they moved there (no `centred` in the card) keep torchvision's cell corners.
"""

from __future__ import annotations

import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOS, FCOSHead
from torchvision.ops import FeaturePyramidNetwork

from pipeline_lib.base.params import HeadParams
from pipeline_lib.models.targets import image_targets
from pipeline_lib.models.torchvision_heads import (
    Placeholder,
    RecordsMatching,
    TorchvisionHead,
    builder,
    matched_measures,
)

Outputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # as FCOSHead names them:
OUTPUT_NAMES = ("cls_logits", "bbox_regression", "bbox_ctrness")


class _RecordingHead(RecordsMatching, FCOSHead):
    """FCOSHead, keeping its last matching (for the measures)."""


class CellCentres(AnchorGenerator):
    """torchvision's anchors with each location at the centre of its feature cell: (x + 1/2)
    stride, as the FCOS paper puts them (torchvision's `AnchorGenerator`: x stride, the corner)."""

    def grid_anchors(self, grid_sizes: list, strides: list) -> list[torch.Tensor]:
        corners = super().grid_anchors(grid_sizes, strides)
        return [
            a + torch.stack([sw, sh, sw, sh]).to(a) / 2
            for a, (sh, sw) in zip(corners, strides, strict=True)
        ]


class FcosHead(TorchvisionHead):
    """Packed cached features (backbones.pack_levels, or one level) -> FCOS's outputs on every
    location of every level: (class logits (B, L, K), box regression (B, L, 4), centerness logits
    (B, L, 1)), the levels concatenated from the finest. `image_size`: S, the side of the image
    the features came from; `width`, `depth`: the pyramid's channels and the towers' 3x3 layers;
    `centred`: locations at the cells' centres (False: their corners, as model files from
    before).
    """

    output_names = OUTPUT_NAMES

    def __init__(
        self,
        feature_shape: tuple[int, int, int],
        n_classes: int,
        image_size: int,
        fine_channels: int = 0,
        width: int = 128,
        depth: int = 4,
        centred: bool = False,
    ):
        super().__init__(feature_shape, n_classes, image_size, fine_channels)
        self.neck = FeaturePyramidNetwork(self.inputs, width)
        self.head = _RecordingHead(width, 1, n_classes, depth)
        strides = [image_size // h for h, _ in self.grids]  # anchor size = stride (FCOS's)
        locations = CellCentres if centred else AnchorGenerator
        anchors = locations(tuple((s,) for s in strides), ((1.0,),) * len(strides))
        # torchvision's FCOS for its matching, loss and decoding (`model`)
        self._model = (
            FCOS(Placeholder(width), n_classes, anchor_generator=anchors, head=self.head),
        )

    def loss(self, outputs: Outputs, targets: tuple[torch.Tensor, torch.Tensor]) -> dict:
        """FCOS's losses of a batch: `targets` (boxes (B, M, 4) xyxy pixels of the S x S image,
        labels (B, M), -1 for padding). "loss" is their sum; box_loss (GIoU), class_loss (focal),
        obj_loss (centerness BCE) as the grid heads name their parts."""
        anchors = self.anchors(len(outputs[0]), outputs[0].device)
        head_outputs = dict(zip(OUTPUT_NAMES, outputs, strict=True))
        parts = self.model.compute_loss(
            image_targets(*targets), head_outputs, anchors, self.per_level()
        )
        box, cls, obj = parts["bbox_regression"], parts["classification"], parts["bbox_ctrness"]
        return {"loss": box + cls + obj, "box_loss": box, "class_loss": cls, "obj_loss": obj}

    def measures(self, outputs: Outputs, targets: tuple[torch.Tensor, torch.Tensor]) -> dict:
        """`torchvision_heads.matched_measures`, a location found where sigmoid(centerness) >
        0.5."""
        cls_logits, regression, ctrness = outputs
        anchors = torch.stack(self.anchors(len(cls_logits), cls_logits.device))
        coder = self.head.box_coder

        def decode(fg: torch.Tensor) -> torch.Tensor:
            return coder.decode(regression[fg], anchors[fg])

        return matched_measures(self, cls_logits, decode, ctrness[..., 0] > 0, targets)


def fcos_entry(hp: HeadParams) -> dict:
    """The card's description of an FCOS head: its pyramid's channels and towers' depth, its
    locations at the cells' centres."""
    return {"kind": "fcos", "width": hp.tower_width, "depth": hp.tower_depth, "centred": True}


build_fcos = builder(FcosHead)
