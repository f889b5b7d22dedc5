"""Heads (pipeline_lib/models/heads.py): layers, sizes, dropout rates, anchors and levels as the
lab's design and the params ask (their files: test_checkpoints.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline_lib.boxes.detection import Filtering
from pipeline_lib.boxes.geometry import ImageSpec
from pipeline_lib.models import heads
from pipeline_lib.models.heads import (
    ConvGridHead,
    LevelTrunk,
    MlpGridHead,
    MlpSingleHead,
    PyramidGridHead,
    SpatialSingleHead,
    TwoLevelMlpHead,
)

CLASSES = ["cat", "dog", "car"]


def test_grid_head_sizes_pooling_and_refusal():
    head = MlpGridHead((16, 7, 9), 3, num_cells=5, hidden=4, dropout=0.0)
    boxes, logits = head(torch.randn(2, 16, 7, 9))
    assert boxes.shape == (2, 4, 5, 5) and logits.shape == (2, 4, 5, 5)
    assert isinstance(head.pool, torch.nn.AdaptiveAvgPool2d)  # 7 x 9 pooled to 5 x 5
    assert isinstance(MlpGridHead((16, 5, 5), 3, num_cells=5).pool, torch.nn.Identity)
    for shape in ((16, 4, 9), (16, 9, 4)):  # too small in either direction
        with pytest.raises(ValueError, match="larger than the"):
            MlpGridHead(shape, 3, num_cells=5)
    # two hidden 1x1 layers on the box branch, as in the lab; dropout before the class conv
    convs = [m for m in head.regression if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(16, 4), (4, 4), (4, 4)]
    assert isinstance(head.classification[0], torch.nn.Dropout)


def test_anchor_sizes_are_the_anchor_times_two_sigmoid_squared():
    anchors = [[0.1, 0.2], [0.4, 0.3]]
    head = MlpGridHead((4, 2, 2), 3, num_cells=2, hidden=4, dropout=0.0, anchors=anchors)
    head.eval()
    with torch.no_grad():
        for module in head.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.zero_()
                module.bias.zero_()
        last = head.regression[-2]  # the box conv: 4 outputs per anchor (cx, cy, w, h)
        last.bias.copy_(torch.tensor([0, 0, 0.0, 1.0, 0, 0, -1.0, 2.0]))
    with torch.no_grad():
        boxes, logits = head(torch.randn(1, 4, 2, 2))
    assert boxes.shape == (1, 2, 4, 2, 2) and logits.shape == (1, 2, 4, 2, 2)
    s = torch.sigmoid(torch.tensor([0.0, 1.0, -1.0, 2.0]))
    expected = [
        0.1 * (2 * s[0]) ** 2,
        0.2 * (2 * s[1]) ** 2,  # anchor 0: t = (0, 1)
        0.4 * (2 * s[2]) ** 2,
        0.3 * (2 * s[3]) ** 2,
    ]  # anchor 1: t = (-1, 2)
    got = [boxes[0, 0, 2, 0, 0], boxes[0, 0, 3, 0, 0], boxes[0, 1, 2, 1, 1], boxes[0, 1, 3, 1, 1]]
    assert [float(g) for g in got] == pytest.approx([float(e) for e in expected])
    assert float(boxes[0, 1, 0, 1, 0]) == pytest.approx(0.5)  # centres: sigmoid(0) in the cell


def test_the_lab_sizes_are_the_defaults():
    single = MlpSingleHead((4, 3, 3), 3)
    assert single.regression[2].out_features == 1024 and single.regression[1].p == 0.5
    assert isinstance(single.classification[0], torch.nn.AdaptiveAvgPool2d)  # pooled
    assert single.classification[2].p == 0.0
    grid = MlpGridHead((4, 7, 7), 3)
    assert grid.num_cells == 7 and grid.regression[1].out_channels == 512
    assert isinstance(grid.pool, torch.nn.Identity) and grid.regression[0].p == 0.5
    two = TwoLevelMlpHead((4 + 4 * 2, 7, 7), 3, 2)
    assert two.coarse.num_cells == 7 and two.fine.num_cells == 14
    assert two.fine.regression[1].out_channels == 512 and two.fine.regression[0].p == 0.5
    with pytest.raises(ValueError, match="classifier must be one of"):
        MlpSingleHead((4, 3, 3), 3, classifier="attention")


def test_the_heads_layers_are_the_labs():
    single = MlpSingleHead((4, 3, 3), 3, hidden=8, dropout=0.3)
    nn = torch.nn
    assert [type(m) for m in single.regression] == [
        nn.Flatten,
        nn.Dropout,
        nn.Linear,
        nn.ReLU,
        nn.BatchNorm1d,
        nn.Dropout,
        nn.Linear,
        nn.Sigmoid,
    ]
    assert single.regression[5].p == 0.3
    grid = MlpGridHead((4, 3, 3), 3, num_cells=3, hidden=8, dropout=0.3)
    assert [type(m) for m in grid.regression] == [
        nn.Dropout,
        nn.Conv2d,
        nn.ReLU,
        nn.BatchNorm2d,
        nn.Dropout,
        nn.Conv2d,
        nn.ReLU,
        nn.BatchNorm2d,
        nn.Conv2d,
        nn.Sigmoid,
    ]
    assert [type(m) for m in grid.classification] == [nn.Dropout, nn.Conv2d]
    assert grid.classification[0].p == 0.3 and grid.regression[4].p == 0.3
    # two levels: both heads get the settings; the fine map (twice the side) is exactly 2S x 2S
    two = TwoLevelMlpHead((4 + 4 * 2, 3, 3), 3, 2, num_cells=3, hidden=8, dropout=0.2)
    for level in (two.coarse, two.fine):
        assert level.regression[0].p == 0.2 and level.classification[0].p == 0.2
        assert isinstance(level.pool, nn.Identity)
    assert two.fine.num_cells == 6 and two.fine_norm.num_features == 2


def test_grid_head_shapes_pooling_and_refusal():
    head = MlpGridHead((16, 14, 14), 3, num_cells=7, hidden=8)
    boxes, logits = head(torch.randn(2, 16, 14, 14))
    assert boxes.shape == (2, 4, 7, 7) and logits.shape == (2, 4, 7, 7)
    assert boxes.min() >= 0 and boxes.max() <= 1
    with pytest.raises(ValueError, match="grid.num_cells 9 is larger than the 7x7 feature map"):
        MlpGridHead((16, 7, 7), 3, num_cells=9)


def test_conv_grid_head_sees_its_neighbours_and_starts_at_the_prior():
    torch.manual_seed(0)
    head = ConvGridHead((16, 10, 10), 3, num_cells=5, width=8, depth=2).eval()
    boxes, logits = head(torch.randn(2, 16, 10, 10))
    assert boxes.shape == (2, 4, 5, 5) and logits.shape == (2, 4, 5, 5)
    assert isinstance(head.pool, torch.nn.AdaptiveAvgPool2d)  # 10 x 10 pooled to 5 x 5
    convs = [m for m in head.trunk if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (16, 8, (1, 1)),
        (8, 8, (3, 3)),
        (8, 8, (3, 3)),
    ]
    # a cell's centre reaches half a cell beyond it (2 sigmoid - 0.5), its size stays in [0, 1]
    assert boxes[:, :2].min() >= -0.5 and boxes[:, :2].max() <= 1.5
    assert boxes[:, 2:].min() >= 0 and boxes[:, 2:].max() <= 1
    assert not any(isinstance(m, torch.nn.Dropout) for m in head.modules())
    # objectness bias: log(0.01 / 0.99), so sigmoid = 0.01 before training
    assert torch.sigmoid(head.classification.bias[-1]).item() == pytest.approx(0.01)
    # two 3x3 layers: a change in cell (0, 0) reaches cell (2, 2) and no further
    x = torch.zeros(1, 16, 5, 5)
    base = ConvGridHead((16, 5, 5), 3, num_cells=5, width=8, depth=2).eval()
    y = x.clone()
    y[0, :, 0, 0] = 5.0
    changed = (base(y)[1] - base(x)[1]).abs().sum(dim=1)[0] > 0
    assert changed[2, 2] and not changed[3, 3] and not changed[0, 3]
    with pytest.raises(ValueError, match="larger than the"):
        ConvGridHead((16, 4, 4), 3, num_cells=5)


def test_conv_grid_head_with_anchors_by_hand():
    """Per cell and anchor a box (centre as `gridcoding.raw_cell_boxes`, size anchor *
    (2 sigmoid)^2), class logits and an objectness logit at the prior; the anchor-free head's
    weights unchanged."""
    anchors = [[0.1, 0.2], [0.4, 0.3]]
    torch.manual_seed(0)
    plain = ConvGridHead((16, 3, 3), 3, num_cells=3, width=8, depth=1)
    torch.manual_seed(0)
    head = ConvGridHead((16, 3, 3), 3, num_cells=3, width=8, depth=1, anchors=anchors).eval()
    assert set(head.state_dict()) - set(plain.state_dict()) == {"anchors"}
    assert torch.equal(head.trunk[0].weight, plain.trunk[0].weight)  # same draws, same order
    bias = head.classification.bias.view(2, 4)  # per anchor: 3 classes, then objectness
    assert torch.sigmoid(bias[:, 3]).tolist() == pytest.approx([0.01, 0.01])
    assert (bias[:, :3] != bias[0, 3]).all()
    with torch.no_grad():
        head.box.weight.zero_()
        head.box.bias.copy_(torch.tensor([0.0, 0, 0, 1, 1, -1, -1, 2]))
    boxes, logits = head(torch.randn(2, 16, 3, 3))
    assert boxes.shape == (2, 2, 4, 3, 3) and logits.shape == (2, 2, 4, 3, 3)
    s = torch.sigmoid(torch.tensor([0.0, 1.0, -1.0, 2.0]))
    want = [
        [0.5, 0.5, 0.1 * (2 * s[0]) ** 2, 0.2 * (2 * s[1]) ** 2],  # anchor 0: raw (0, 0, 0, 1)
        [2 * s[1] - 0.5, 2 * s[2] - 0.5, 0.4 * (2 * s[2]) ** 2, 0.3 * (2 * s[3]) ** 2],
    ]
    for a in range(2):
        assert boxes[1, a, :, 2, 0].tolist() == pytest.approx([float(v) for v in want[a]])


def test_pyramid_head_shares_its_weights_and_feeds_the_main_map_to_the_fine_level():
    torch.manual_seed(0)
    main, fine = 16, 6
    head = PyramidGridHead((main + 4 * fine, 4, 4), 3, fine, num_cells=4, width=8, depth=2).eval()
    packed = torch.randn(2, main + 4 * fine, 4, 4)
    boxes, logits, fine_boxes, fine_logits = head(packed)
    assert boxes.shape == (2, 4, 4, 4) and logits.shape == (2, 4, 4, 4)
    assert fine_boxes.shape == (2, 4, 8, 8) and fine_logits.shape == (2, 4, 8, 8)
    # one set of 3x3 and output convolutions for both levels, a BatchNorm per level
    convs = [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)]
    assert sum(c.kernel_size == (3, 3) for c in convs) == 2 and len(head.trunk.norms) == 2
    assert sum(c.out_channels == 4 and c.kernel_size == (1, 1) for c in convs) == 2  # box, class
    assert torch.sigmoid(head.classification.bias[-1]).item() == pytest.approx(0.01)
    # the main map reaches the fine level (top-down), the fine map does not reach the main level
    changed = packed.clone()
    changed[:, :main] += 1.0
    assert not torch.allclose(head(changed)[3], fine_logits)
    changed = packed.clone()
    changed[:, main:] += 1.0
    after = head(changed)
    assert torch.equal(after[1], logits) and not torch.allclose(after[3], fine_logits)


def test_spatial_single_head_pools_the_cells_by_their_weights():
    torch.manual_seed(0)
    head = SpatialSingleHead((16, 4, 6), 3, width=8, depth=1).eval()
    boxes, logits = head(torch.randn(2, 16, 4, 6))
    assert boxes.shape == (2, 4) and logits.shape == (2, 3)
    assert sum(p.numel() for p in head.parameters()) < 1000
    # one cell dominating the softmax: the image's box and logits are that cell's
    with torch.no_grad():
        head.where.weight.zero_()
        head.where.bias.zero_()
    x = torch.randn(1, 16, 4, 6)
    with torch.no_grad():
        trunk = head.trunk(x)
        where = torch.full((1, 1, 4, 6), -50.0)
        where[0, 0, 2, 5] = 50.0  # row 2, column 5
        head.where.forward = lambda _: where
        boxes, logits = head(x)
        raw = head.box(trunk)[0, :, 2, 5]
        centre = 2 * torch.sigmoid(raw[:2]) - 0.5
        expected = [(centre[0] + 5) / 6, (centre[1] + 2) / 4, *torch.sigmoid(raw[2:])]
        assert boxes[0].tolist() == pytest.approx([float(v) for v in expected], abs=1e-6)
        assert logits[0].tolist() == pytest.approx(head.classification(trunk)[0, :, 2, 5].tolist())


@pytest.mark.parametrize("kind", ["conv", "spatial"])
def test_dropout_acts_on_the_trunk_output_in_training_only(kind):
    torch.manual_seed(0)

    def make(dropout):
        if kind == "conv":
            return ConvGridHead((16, 5, 5), 3, num_cells=5, width=8, depth=1, dropout=dropout)
        return SpatialSingleHead((16, 5, 5), 3, width=8, depth=1, dropout=dropout)

    plain, dropped = make(0.0), make(0.5)
    assert plain.state_dict().keys() == dropped.state_dict().keys()  # same checkpoints
    dropped.load_state_dict(plain.state_dict())
    x = torch.randn(4, 16, 5, 5)
    for a, b in zip(plain.eval()(x), dropped.eval()(x), strict=True):
        assert torch.equal(a, b)  # evaluation: no dropout
    assert isinstance(dropped.trunk[-1], torch.nn.Dropout) and dropped.trunk[-1].p == 0.5
    dropped.train()
    trunk_out = dropped.trunk(x)
    zeros = (trunk_out == 0).float().mean().item()  # SiLU outputs are non-zero, so these are
    assert 0.35 < zeros < 0.65  # the dropped ones: about half of 4 x 8 x 5 x 5 = 800


def test_the_conv_heads_defaults_and_their_bias_free_trunks():
    """width 256, depth 3, no dropout, 7 cells; the convolutions before a BatchNorm have no bias
    (the BatchNorm's shift plays its part), and the anchor-free heads say they have no anchors."""
    nn = torch.nn
    conv = ConvGridHead((16, 7, 7), 3)
    pyramid = PyramidGridHead((16 + 4 * 2, 7, 7), 3, 2)
    spatial = SpatialSingleHead((16, 7, 7), 3)
    assert conv.num_cells == pyramid.num_cells == 7 and conv.n_anchors == pyramid.n_anchors == 0
    for trunk in (conv.trunk, spatial.trunk):
        convs = [m for m in trunk if isinstance(m, nn.Conv2d)]
        assert [c.out_channels for c in convs] == [256] * 4  # the 1x1, then three 3x3
        assert all(c.bias is None for c in convs)
        assert not any(isinstance(m, nn.Dropout) for m in trunk)
    assert len(pyramid.trunk.convs) == 3 and pyramid.trunk.convs[0].out_channels == 256
    assert all(c.bias is None for c in pyramid.trunk.convs)
    assert isinstance(pyramid.trunk.dropout, nn.Identity)
    assert isinstance(LevelTrunk(8, 1, 2).dropout, nn.Identity)
    for lateral in (pyramid.lateral, pyramid.fine_lateral):  # 1x1, BatchNorm, SiLU: no dropout
        assert [type(m) for m in lateral] == [nn.Conv2d, nn.BatchNorm2d, nn.SiLU]
    assert isinstance(pyramid.pool, nn.Identity) and isinstance(pyramid.fine_pool, nn.Identity)
    # dropout, where asked, after the shared trunk of the pyramid too
    dropped = PyramidGridHead((16 + 4 * 2, 7, 7), 3, 2, dropout=0.3)
    assert dropped.trunk.dropout.p == 0.3


def test_the_pyramids_fine_level_adds_the_upsampled_main_map():
    """The fine level's input: its own lateral map plus the main level's, upsampled (nearest);
    the objectness bias at the prior, the class biases left as drawn."""
    torch.manual_seed(0)
    main, fine = 16, 6
    head = PyramidGridHead((main + 4 * fine, 4, 4), 3, fine, num_cells=4, width=8, depth=1).eval()
    packed = torch.randn(2, main + 4 * fine, 4, 4)
    with torch.no_grad():
        top = head.lateral(packed[:, :main])
        own = head.fine_lateral(head.fine_norm(F.pixel_shuffle(packed[:, main:], 2)))
        x = head.trunk(own + top.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3), 1)
        assert torch.allclose(head(packed)[3], head.classification(x), atol=1e-6)
    prior = math.log(0.01 / 0.99)
    assert (head.classification.bias[:-1] != prior).all()


def test_a_grid_heads_levels_go_to_grid_detections_in_pairs(monkeypatch):
    """(boxes, logits) per level, in order: a two-level head's four outputs are two pairs."""
    seen = []
    monkeypatch.setattr(heads, "grid_detections", lambda *args: seen.append(args) or [])
    outputs = [torch.tensor([float(n)]) for n in range(4)]
    keep, spec = Filtering(), ImageSpec("shrink", 64)
    assert heads.GridContract().detections(outputs, [(5, 5)], spec, keep) == []
    [(boxes, logits, sizes, got_spec, got_keep)] = seen
    assert [b.item() for b in boxes] == [0.0, 2.0] and [g.item() for g in logits] == [1.0, 3.0]
    assert (sizes, got_spec, got_keep) == ([(5, 5)], spec, keep)
