"""Detection heads trained on cached backbone features (checkpoints.py saves and rebuilds them).

MlpSingleHead (the lab's first task): from a (B, C, H, W) feature map, the encoded box
(cx, cy, w, h in [0, 1]) and the class logits of the image's largest object.
MlpGridHead (the second): per cell of an S x S grid, a box (centre relative to the cell,
size relative to the image), class logits and an objectness logit -- an MLP slid over the feature
map as 1x1 convolutions. TwoLevelMlpHead: one of those per feature level (multi-scale).
The conv heads share `conv_trunk` (a 1x1 stem, then 3x3 convolutions) and give the same outputs:
SpatialSingleHead (the default single head: one box and class by attention over the cells),
ConvGridHead (with or without anchors) and, on two feature levels, PyramidGridHead (FPN, one head
shared by the levels). The default grid head is torchvision's FCOS (fcos.py).
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from pipeline_lib.base.params import GridParams, HeadParams
from pipeline_lib.boxes.detection import Detections, Filtering, grid_detections, single_detections
from pipeline_lib.boxes.geometry import ImageSpec
from pipeline_lib.boxes.gridcoding import anchor_sizes, decode_grid_map, raw_cell_boxes
from pipeline_lib.data.tables import Prepared
from pipeline_lib.features.backbones import unpack_levels
from pipeline_lib.measures.metrics import multi_object_batch_sums, single_object_batch_sums
from pipeline_lib.models.losses import LossWeights, Objective, grid_loss, single_object_loss
from pipeline_lib.models.modelcard import GridSpec, ModelCard
from pipeline_lib.models.targets import card_levels, multi_object_targets

CLASSIFIERS = ("flatten", "pooled")


class SingleContract:
    """What every single-object head answers besides its forward pass (headkinds.py lists them)."""

    def detections(
        self,
        outputs: tuple[torch.Tensor, torch.Tensor],
        sizes: list[tuple[int, int]],
        spec: ImageSpec,
        keep: Filtering,
    ) -> list[Detections]:
        """(boxes (B, 4) fractions, logits (B, K)) -> one detection per image, in the pixels of
        the B images whose (width, height) are `sizes` (`keep` does not apply: one box each)."""
        return single_detections(*outputs, sizes, spec)

    def objective(self, weights: LossWeights) -> Objective:
        """Its loss (`losses.single_object_loss` weighted by `weights`) and training measures,
        of its outputs against (boxes, labels) of the largest objects."""
        loss = partial(single_object_loss, weights=weights)
        return Objective(lambda o, t: loss(*o, *t), single_object_batch_sums)


class GridContract:
    """What every grid head answers besides its forward pass (headkinds.py lists them): its
    outputs, (boxes, logits) per level, decoded cell by cell, and the objects its cells can
    learn."""

    def detections(
        self,
        outputs: tuple[torch.Tensor, ...],
        sizes: list[tuple[int, int]],
        spec: ImageSpec,
        keep: Filtering,
    ) -> list[Detections]:
        """(boxes, logits) per level for B images -> each image's detections in its own pixels
        (`detection.grid_detections`: the levels together, then `keep`)."""
        return grid_detections(outputs[0::2], outputs[1::2], sizes, spec, keep)

    def learnable_objects(self, card: ModelCard, prepared: Prepared, ids: list[str]) -> int:
        """How many objects of images `ids` the card's grid can learn: not cut away by the
        image mode, not lost in a cell (and anchor) collision."""
        learnable = 0
        for level in card_levels(card.grid):
            t = multi_object_targets(prepared.images, prepared.objects, ids, card.image, level)
            learnable += int(t.objects.sum() - t.dropped.sum())
        return learnable

    def objective(self, weights: LossWeights) -> Objective:
        """Its loss (`losses.grid_loss` weighted by `weights`) and training measures, of its
        outputs against `targets.grid_targets`."""
        return Objective(partial(grid_loss, weights=weights), multi_object_batch_sums)


def grid_pool(feature_shape: tuple[int, int, int], num_cells: int) -> nn.Module:
    """What brings a (C, H, W) feature map to S x S cells: nothing when it is S x S, adaptive
    average pooling when larger; ValueError when it is smaller."""
    _, height, width = feature_shape
    if height < num_cells or width < num_cells:
        raise ValueError(
            f"grid.num_cells {num_cells} is larger than the {height}x{width} feature map; "
            f"use at most {min(height, width)} (or a larger image.size)"
        )
    same = (height, width) == (num_cells, num_cells)
    return nn.Identity() if same else nn.AdaptiveAvgPool2d(num_cells)


class MlpSingleHead(SingleContract, nn.Module):
    """Box regression and classification of the largest object.

    regression:     Flatten -> Dropout -> Linear(C*H*W, hidden) -> ReLU -> BatchNorm1d -> Dropout
                    -> Linear(hidden, 4) -> Sigmoid                       (as in the original lab)
    classification: `flatten`: Flatten -> Dropout(classifier_dropout) -> Linear(C*H*W, n_classes)
                    `pooled`:  global average pool -> Dropout(classifier_dropout) -> Linear(C, ...)
    """

    def __init__(
        self,
        feature_shape: tuple[int, int, int],
        n_classes: int,
        hidden: int = 1024,
        dropout: float = 0.5,
        classifier: str = "pooled",
        classifier_dropout: float = 0.0,
    ):
        super().__init__()
        if classifier not in CLASSIFIERS:
            raise ValueError(f"classifier must be one of {CLASSIFIERS}, got {classifier!r}")
        channels, height, width = feature_shape
        flat = channels * height * width
        self.regression = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(flat, hidden),
            nn.ReLU(),
            nn.BatchNorm1d(hidden),
            nn.Dropout(dropout),
            nn.Linear(hidden, 4),
            nn.Sigmoid(),
        )
        pool = [nn.AdaptiveAvgPool2d(1)] if classifier == "pooled" else []
        inputs = channels if classifier == "pooled" else flat
        self.classification = nn.Sequential(
            *pool, nn.Flatten(), nn.Dropout(classifier_dropout), nn.Linear(inputs, n_classes)
        )

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) float -> (boxes (B, 4) encoded, class logits (B, n_classes))."""
        return self.regression(features), self.classification(features)


class MlpGridHead(GridContract, nn.Module):
    """Grid head, as in the lab.

    regression:     2 x [Dropout -> Conv1x1(hidden) -> ReLU -> BatchNorm2d] -> Conv1x1(4) -> Sigmoid
    classification: Dropout -> Conv1x1(n_classes + 1): class logits, then one objectness logit.
    A feature map larger than num_cells x num_cells is average-pooled to it first (adaptive
    pooling); a smaller one is refused.

    With A `anchors` ((w, h) image fractions, see anchors.py) the two last convolutions give A
    times as many channels: per cell and anchor a box, n_classes logits and an objectness logit.
    The box size is anchor * (2 sigmoid(t))^2 (YOLOv5's form: the anchor itself at t = 0, bounded
    by 4 x anchor, smooth gradients), the centre stays sigmoid(t) within the cell. The anchors are
    a buffer, saved with the weights.
    """

    def __init__(
        self,
        feature_shape: tuple[int, int, int],
        n_classes: int,
        num_cells: int = 7,
        hidden: int = 512,
        dropout: float = 0.5,
        anchors: list[list[float]] | None = None,
    ):
        super().__init__()
        channels = feature_shape[0]
        pool = grid_pool(feature_shape, num_cells)
        self.num_cells = num_cells
        self.n_anchors = len(anchors) if anchors else 0
        slots = max(self.n_anchors, 1)
        if anchors:  # only then: the anchor-free head's state dict stays as it was
            self.register_buffer("anchors", torch.tensor(anchors, dtype=torch.float32))
        self.pool = pool
        layers: list[nn.Module] = []
        inputs = channels
        for _ in range(2):
            layers += [
                nn.Dropout(dropout),
                nn.Conv2d(inputs, hidden, 1),
                nn.ReLU(),
                nn.BatchNorm2d(hidden),
            ]
            inputs = hidden
        self.regression = nn.Sequential(*layers, nn.Conv2d(hidden, 4 * slots, 1), nn.Sigmoid())
        self.classification = nn.Sequential(
            nn.Dropout(dropout), nn.Conv2d(channels, (n_classes + 1) * slots, 1)
        )

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) -> (boxes (B, 4, S, S) in [0, 1], logits (B, n_classes + 1, S, S));
        with A anchors (boxes (B, A, 4, S, S), logits (B, A, n_classes + 1, S, S))."""
        x = self.pool(features)
        boxes, logits = self.regression(x), self.classification(x)
        if not self.n_anchors:
            return boxes, logits
        b, a, s = len(x), self.n_anchors, self.num_cells
        boxes, logits = boxes.view(b, a, 4, s, s), logits.view(b, a, -1, s, s)
        sizes = anchor_sizes(boxes[:, :, 2:], self.anchors)
        return torch.cat([boxes[:, :, :2], sizes], dim=2), logits


def conv_trunk(channels: int, width: int, depth: int, dropout: float = 0.0) -> nn.Sequential:
    """The shared trunk of the conv heads: a 1x1 convolution bringing the backbone's C channels
    to `width` (cheap on a large map: 1280 -> 256 costs a ninth of a 3x3 one), then `depth` 3x3
    convolutions at `width`, so that each cell sees its neighbours; each followed by BatchNorm
    and SiLU, as in YOLO/FCOS heads; then Dropout(`dropout`) if it is > 0 (no weights: the state
    dict is the same either way). (B, C, H, W) -> (B, width, H, W)."""
    layers: list[nn.Module] = []
    for k in range(depth + 1):
        inputs, kernel = (channels, 1) if k == 0 else (width, 3)
        layers.append(nn.Conv2d(inputs, width, kernel, padding=kernel // 2, bias=False))
        layers += [nn.BatchNorm2d(width), nn.SiLU()]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class ConvGridHead(GridContract, nn.Module):
    """A detection head beyond the lab's (head.grid_kind: conv): `conv_trunk` shared by the box,
    class and objectness outputs (1x1 convolutions). No dropout on the raw features; `dropout` on
    the trunk's output (training only: a regulariser, the weights are the same). Outputs as
    `MlpGridHead` gives them (same targets, losses, decoding), but the centre of a cell's box
    may lie up to half a cell outside it (`gridcoding.raw_cell_boxes`), for grid.assign: neighbours.

    With A `anchors` ((w, h) image fractions) the 1x1 outputs have A times the channels: per cell
    and anchor a box whose size is anchor * (2 sigmoid(t))^2 (`gridcoding.anchor_sizes`), class
    logits and an objectness logit, shaped as `MlpGridHead`'s with anchors.

    The objectness bias starts at the log-odds of `prior` (RetinaNet's init: most cells are empty,
    so the first epochs do not drown in easy negatives).
    """

    def __init__(
        self,
        feature_shape: tuple[int, int, int],
        n_classes: int,
        num_cells: int = 7,
        width: int = 256,
        depth: int = 3,
        dropout: float = 0.0,
        prior: float = 0.01,
        anchors: list[list[float]] | None = None,
    ):
        super().__init__()
        self.num_cells, self.n_anchors = num_cells, len(anchors) if anchors else 0
        slots = max(self.n_anchors, 1)
        if anchors:  # only then: the anchor-free head's state dict stays as it was
            self.register_buffer("anchors", torch.tensor(anchors, dtype=torch.float32))
        self.pool = grid_pool(feature_shape, num_cells)
        self.trunk = conv_trunk(feature_shape[0], width, depth, dropout)
        self.box = nn.Conv2d(width, 4 * slots, 1)
        self.classification = nn.Conv2d(width, (n_classes + 1) * slots, 1)
        init_objectness(self.classification, slots, prior)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) -> (boxes (B, 4, S, S) cell boxes, logits (B, n_classes + 1, S, S));
        with A anchors (boxes (B, A, 4, S, S), logits (B, A, n_classes + 1, S, S))."""
        x = self.trunk(self.pool(features))
        return grid_outputs(self.box(x), self.classification(x), getattr(self, "anchors", None))


def init_objectness(classification: nn.Conv2d, slots: int, prior: float) -> None:
    """Set the objectness logit's bias (the last of each slot's n_classes + 1 channels) to the
    log-odds of `prior`."""
    with torch.no_grad():
        classification.bias.view(slots, -1)[:, -1] = math.log(prior / (1 - prior))


def grid_outputs(
    raw: torch.Tensor, logits: torch.Tensor, anchors: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A conv head's 1x1 outputs (B, 4 A, S, S) and (B, (K + 1) A, S, S) -> (cell boxes, logits)
    as `MlpGridHead` gives them: without anchors (A = 1) `gridcoding.raw_cell_boxes(raw)`
    and the logits; with (A, 2) anchors (B, A, 4, S, S) cell boxes and (B, A, K + 1, S, S)
    logits."""
    if anchors is None:
        return raw_cell_boxes(raw), logits
    b, a, height, width = len(raw), len(anchors), *raw.shape[-2:]
    raw, logits = raw.view(b, a, 4, height, width), logits.view(b, a, -1, height, width)
    return raw_cell_boxes(raw, anchors), logits


class LevelTrunk(nn.Module):
    """`depth` 3x3 convolutions at `width` shared by the levels of a pyramid, each followed by a
    BatchNorm of its level's own (the levels' statistics differ: EfficientDet's shared head) and
    SiLU; then Dropout(`dropout`) if > 0. (B, width, h, w) of level `level` -> the same shape."""

    def __init__(self, width: int, depth: int, levels: int, dropout: float = 0.0):
        super().__init__()
        conv = [nn.Conv2d(width, width, 3, padding=1, bias=False) for _ in range(depth)]
        self.convs = nn.ModuleList(conv)
        self.norms = nn.ModuleList(
            nn.ModuleList(nn.BatchNorm2d(width) for _ in range(depth)) for _ in range(levels)
        )
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, level: int) -> torch.Tensor:
        for conv, norm in zip(self.convs, self.norms[level], strict=True):
            x = F.silu(norm(conv(x)))
        return self.dropout(x)


class PyramidGridHead(GridContract, nn.Module):
    """The conv grid head on two feature levels (head.grid_kind: conv with backbone.fine_layer):
    a feature pyramid (FPN, Lin et al. 2017) then one head shared by both levels.

    Features come packed (backbones.pack_levels): the main map (C1 channels, S x S cells) and the
    fine, stride-16 one (C2 channels, 2S x 2S). Each goes through a 1x1 lateral convolution to
    `width` (with BatchNorm and SiLU; the fine map, an inner block's raw residual stream, through
    a BatchNorm first, as `TwoLevelMlpHead`); the main level's is upsampled (nearest) and added to
    the fine level's, so the fine cells see the deeper map too. `LevelTrunk` and the 1x1 box and
    class convolutions then run on each level with the same weights. Outputs: (boxes, logits) of
    the main level, then of the fine level, as `TwoLevelMlpHead` gives them (targets by size:
    grid.fine_below; both levels decoded together before NMS).
    """

    def __init__(
        self,
        feature_shape: tuple[int, int, int],
        n_classes: int,
        fine_channels: int,
        num_cells: int = 7,
        width: int = 256,
        depth: int = 3,
        dropout: float = 0.0,
        prior: float = 0.01,
    ):
        super().__init__()
        channels, height, wide = feature_shape
        main = channels - 4 * fine_channels
        self.fine_channels, self.num_cells, self.n_anchors = fine_channels, num_cells, 0
        self.pool = grid_pool((main, height, wide), num_cells)
        self.fine_pool = grid_pool((fine_channels, 2 * height, 2 * wide), 2 * num_cells)
        self.fine_norm = nn.BatchNorm2d(fine_channels)
        self.lateral = conv_trunk(main, width, 0)
        self.fine_lateral = conv_trunk(fine_channels, width, 0)
        self.trunk = LevelTrunk(width, depth, 2, dropout)
        self.box = nn.Conv2d(width, 4, 1)
        self.classification = nn.Conv2d(width, n_classes + 1, 1)
        init_objectness(self.classification, 1, prior)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Packed features -> (boxes, logits) of the S x S level, then of the 2S x 2S level."""
        main, fine = unpack_levels(features, self.fine_channels)
        top = self.lateral(self.pool(main))
        fine = self.fine_lateral(self.fine_pool(self.fine_norm(fine)))
        fine = fine + F.interpolate(top, scale_factor=2, mode="nearest")
        outputs: list[torch.Tensor] = []
        for level, x in enumerate((top, fine)):
            x = self.trunk(x, level)
            outputs += [raw_cell_boxes(self.box(x)), self.classification(x)]
        return tuple(outputs)


class SpatialSingleHead(SingleContract, nn.Module):
    """A single-object head beyond the lab's (head.single_kind: spatial): `conv_trunk` on the
    feature map, then per cell a box (`gridcoding.raw_cell_boxes`), class logits and a "holds
    the object" logit.
    The image's box and class logits are the cells' averages weighted by the softmax of that
    logit over the H x W cells (attention pooling: a soft choice of the object's cell, trained
    through the same box and class losses as the lab's head). A few 100k weights instead of the
    lab's 64M-weight MLP on the flattened map. `dropout`: on the trunk's output, as ConvGridHead.
    """

    def __init__(
        self,
        feature_shape: tuple[int, int, int],
        n_classes: int,
        width: int = 256,
        depth: int = 3,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.trunk = conv_trunk(feature_shape[0], width, depth, dropout)
        self.box = nn.Conv2d(width, 4, 1)
        self.classification = nn.Conv2d(width, n_classes, 1)
        self.where = nn.Conv2d(width, 1, 1)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) float -> (boxes (B, 4) encoded fractions, class logits (B, n_classes))."""
        x = self.trunk(features)
        weights = torch.softmax(self.where(x).flatten(1), dim=1).unsqueeze(1)  # (B, 1, H*W)
        fractions = decode_grid_map(raw_cell_boxes(self.box(x)))  # (B, 4, H*W)
        boxes = (fractions * weights).sum(dim=2)
        logits = (self.classification(x).flatten(2) * weights).sum(dim=2)
        return boxes, logits


class TwoLevelMlpHead(GridContract, nn.Module):
    """Grid heads on two feature levels (SSD / YOLOv3 style): a `MlpGridHead` on the main
    level (S x S cells) and one on the fine, stride-16 level (2S x 2S cells), each with its own
    weights. Features come packed (see backbones.pack_levels): (B, C1 + 4 * fine_channels, h, w).
    The fine level is an inner block's raw residual output (Lite0 blocks.4: std about 7, values
    up to 70, against 0.8 and 6 for the final, normalised map), so a BatchNorm2d standardises it
    first.
    """

    def __init__(
        self,
        feature_shape: tuple[int, int, int],
        n_classes: int,
        fine_channels: int,
        num_cells: int = 7,
        hidden: int = 512,
        dropout: float = 0.5,
    ):
        super().__init__()
        channels, height, width = feature_shape
        self.fine_channels = fine_channels
        self.coarse = MlpGridHead(
            (channels - 4 * fine_channels, height, width), n_classes, num_cells, hidden, dropout
        )
        self.fine_norm = nn.BatchNorm2d(fine_channels)
        self.fine = MlpGridHead(
            (fine_channels, 2 * height, 2 * width), n_classes, 2 * num_cells, hidden, dropout
        )

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Packed features -> (boxes, logits) of the main level, then of the fine level, as
        `MlpGridHead` gives them."""
        coarse, fine = unpack_levels(features, self.fine_channels)
        return (*self.coarse(coarse), *self.fine(self.fine_norm(fine)))


# What the registry (headkinds.py) needs of these kinds besides the classes: the card's head
# entry from params head.* (its key order is the model file's), the head from a card, and the
# grid layout from params grid.* (with the k-means anchors, when grid.anchors asks for them).


def mlp_single_entry(hp: HeadParams) -> dict:
    return {
        "kind": "lab",
        "hidden": hp.hidden,
        "dropout": hp.dropout,
        "classifier": hp.classifier,
        "classifier_dropout": hp.classifier_dropout,
    }


def conv_entry(kind: str, hp: HeadParams) -> dict:
    """The card's description of a conv-trunk head (ConvGridHead / PyramidGridHead /
    SpatialSingleHead)."""
    return {"kind": kind, "width": hp.conv_width, "depth": hp.conv_depth, "dropout": hp.dropout}


def mlp_grid_entry(hp: HeadParams) -> dict:
    return {"kind": "lab", "hidden": hp.grid_hidden, "dropout": hp.dropout}


def _arguments(card: ModelCard) -> tuple[tuple[int, int, int], int, dict]:
    """(feature shape, classes, the head's keyword arguments: its card entry without the kind)."""
    config = {k: v for k, v in card.head.items() if k != "kind"}
    return tuple(card.feature_shape), len(card.classes), config


def build_mlp_single(card: ModelCard) -> nn.Module:
    shape, n_classes, config = _arguments(card)
    return MlpSingleHead(shape, n_classes, **config)


def build_spatial_single(card: ModelCard) -> nn.Module:
    shape, n_classes, config = _arguments(card)
    return SpatialSingleHead(shape, n_classes, **config)


def build_mlp_grid(card: ModelCard) -> nn.Module:
    (shape, n_classes, config), grid = _arguments(card), card.grid
    if grid.fine_channels:
        return TwoLevelMlpHead(shape, n_classes, grid.fine_channels, grid.num_cells, **config)
    return MlpGridHead(shape, n_classes, grid.num_cells, anchors=grid.anchors, **config)


def build_conv_grid(card: ModelCard) -> nn.Module:
    (shape, n_classes, config), grid = _arguments(card), card.grid
    if grid.fine_channels:
        return PyramidGridHead(shape, n_classes, grid.fine_channels, grid.num_cells, **config)
    return ConvGridHead(shape, n_classes, grid.num_cells, anchors=grid.anchors, **config)


def best_anchor_layout(
    grid: GridParams, fine_channels: int, feature_shape: list[int], anchors: list | None
) -> GridSpec:
    """The lab's grid: each object to its best anchor's slot."""
    fine_below = grid.fine_below if fine_channels else None
    return GridSpec(grid.num_cells, anchors, fine_channels, fine_below, grid.assign)


def close_anchors_layout(
    grid: GridParams, fine_channels: int, feature_shape: list[int], anchors: list | None
) -> GridSpec:
    """The conv heads' grid: with anchors, an object to every anchor close to its shape
    (grid.anchor_ratio, YOLOv5's rule)."""
    fine_below = grid.fine_below if fine_channels else None
    ratio = grid.anchor_ratio if anchors is not None else None
    return GridSpec(grid.num_cells, anchors, fine_channels, fine_below, grid.assign, ratio)


def levels_layout(
    grid: GridParams, fine_channels: int, feature_shape: list[int], anchors: list | None
) -> GridSpec:
    """The heads that assign boxes themselves (FCOS, RetinaNet): the cached levels only (the
    main map's side as num_cells, the fine level's channels); grid.* does not apply."""
    return GridSpec(feature_shape[1], None, fine_channels)
