"""Training losses (losses.py): the parts by hand, weights, anchors and two levels."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline_lib.models.losses import (
    LossWeights,
    box_loss,
    grid_loss,
    multi_object_loss,
    single_object_loss,
)


@pytest.mark.parametrize("obj_loss", ["bce", "focal"])
def test_grid_loss_counts_object_cells_only_for_box_and_class(obj_loss):
    pred = torch.full((1, 4, 2, 2), 0.5)
    target = pred.clone()
    target[0, :, 1, 1] = 0.9  # wrong only in an empty cell: no box loss
    has_obj = torch.tensor([[[1, 0], [0, 0]]], dtype=torch.uint8)
    logits = torch.zeros(1, 3, 2, 2)
    labels = torch.zeros(1, 2, 2, dtype=torch.long)
    losses = multi_object_loss(
        pred, logits, target, has_obj, labels, LossWeights(obj_loss=obj_loss)
    )
    assert losses["box_loss"] == 0
    assert losses["class_loss"] == pytest.approx(torch.log(torch.tensor(2.0)).item())
    assert losses["obj_loss"] > 0


def test_anchored_loss_counts_only_assigned_slots():
    s, a = 2, 2
    boxes = torch.zeros(1, a, 4, s, s)
    has_obj = torch.zeros(1, a, s, s, dtype=torch.uint8)
    labels = torch.zeros(1, a, s, s, dtype=torch.int64)
    boxes[0, 1, :, 0, 1] = torch.tensor([0.5, 0.5, 0.3, 0.3])
    has_obj[0, 1, 0, 1], labels[0, 1, 0, 1] = 1, 2
    logits = torch.zeros(1, a, 4, s, s)
    pred = boxes.clone()
    base = multi_object_loss(pred, logits, boxes, has_obj, labels)
    assert base["box_loss"].item() == 0.0
    pred[0, 0, :, 0, 1] = 0.9  # wrong box in the other anchor's slot of the same cell: no loss
    assert multi_object_loss(pred, logits, boxes, has_obj, labels)["box_loss"].item() == 0.0
    pred[0, 1, 0, 0, 1] = 0.7  # 0.2 off in one of 4 coordinates: SmoothL1 0.5 * 0.2^2 / 4
    assert multi_object_loss(pred, logits, boxes, has_obj, labels)["box_loss"].item() == (
        pytest.approx(0.005)
    )
    # objectness: BCE of logit 0 is ln 2 in every one of the 8 slots
    assert base["obj_loss"].item() == pytest.approx(0.6931, abs=1e-4)


def test_single_object_loss_by_hand_and_its_weights():
    pred, boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2]]), torch.tensor([[0.5, 0.5, 0.2, 1.2]])
    logits, labels = torch.zeros(1, 4), torch.tensor([2])
    losses = single_object_loss(pred, logits, boxes, labels)
    # SmoothL1 (beta 1) of one coordinate off by 1.0: 1.0 - 0.5 = 0.5, mean over 4: 0.125
    assert losses["box_loss"].item() == pytest.approx(0.125)
    assert losses["class_loss"].item() == pytest.approx(math.log(4))
    weighted = single_object_loss(pred, logits, boxes, labels, LossWeights(2.0, 0.5))
    assert weighted["loss"].item() == pytest.approx(2 * 0.125 + 0.5 * math.log(4))


def test_grid_loss_of_two_levels_is_the_sum_of_each_level():
    g = torch.Generator().manual_seed(0)

    def level(s):
        outputs = (torch.rand(2, 4, s, s, generator=g), torch.randn(2, 3, s, s, generator=g))
        has_obj = (torch.rand(2, s, s, generator=g) > 0.7).to(torch.uint8)
        labels = torch.randint(0, 2, (2, s, s), generator=g)
        return outputs, (torch.rand(2, 4, s, s, generator=g), has_obj, labels)

    (coarse_out, coarse_t), (fine_out, fine_t) = level(2), level(4)
    weights = LossWeights(obj_weight=3.0, obj_loss="focal")
    both = grid_loss((*coarse_out, *fine_out), (*coarse_t, *fine_t), weights)
    one = grid_loss(coarse_out, coarse_t, weights)
    other = multi_object_loss(*fine_out, *fine_t, weights)
    for name in ("loss", "box_loss", "class_loss", "obj_loss"):
        assert both[name].item() == pytest.approx(one[name].item() + other[name].item())
    assert one["loss"].item() == pytest.approx(
        one["box_loss"].item() + one["class_loss"].item() + 3.0 * one["obj_loss"].item()
    )


def test_unknown_objectness_loss_is_refused():
    pred, has_obj = torch.zeros(1, 4, 1, 1), torch.ones(1, 1, 1, dtype=torch.uint8)
    labels = torch.zeros(1, 1, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="obj_loss must be 'bce' or 'focal', got 'mse'"):
        weights = LossWeights(obj_loss="mse")
        multi_object_loss(pred, torch.zeros(1, 2, 1, 1), pred, has_obj, labels, weights)


def test_ciou_box_loss_by_hand():
    # identical boxes: 0; boxes of the same size shifted by their width along x: IoU 0, the
    # enclosing box is 2w x h, centre distance^2 / diagonal^2 = w^2 / (4 w^2 + h^2); same aspect
    # ratio, so 1 - CIoU = 1 + w^2 / (4 w^2 + h^2). With w = 0.2, h = 0.1: 1 + 0.04 / 0.17.
    a = torch.tensor([[0.3, 0.5, 0.2, 0.1], [0.3, 0.5, 0.2, 0.1]])
    b = torch.tensor([[0.3, 0.5, 0.2, 0.1], [0.5, 0.5, 0.2, 0.1]])
    loss = box_loss(a, b, "ciou")
    assert loss.tolist() == pytest.approx([0.0, 1 + 0.04 / 0.17], abs=1e-5)
    assert box_loss(a, b, "smooth_l1").tolist() == pytest.approx([0.0, 0.5 * 0.2**2 / 4])
    with pytest.raises(ValueError, match="box_loss must be"):
        box_loss(a, b, "l2")


def test_iou_objectness_target_and_ciou_on_cell_boxes():
    # S = 2, one object in cell (0, 0), predicted with half its width: IoU 0.5 with the truth
    s = 2
    boxes = torch.zeros(1, 4, s, s)
    boxes[0, :, 0, 0] = torch.tensor([0.5, 0.5, 0.4, 0.4])
    pred = boxes.clone()
    pred[0, 2, 0, 0] = 0.2
    has_obj = torch.zeros(1, s, s, dtype=torch.uint8)
    has_obj[0, 0, 0] = 1
    labels = torch.zeros(1, s, s, dtype=torch.int64)
    logits = torch.zeros(1, 3, s, s)  # objectness logit 0 everywhere: p = 0.5
    w = LossWeights(box_loss="ciou", obj_target="iou")
    parts = multi_object_loss(pred, logits, boxes, has_obj, labels, w)
    # BCE of p = 0.5: -t log 0.5 - (1 - t) log 0.5 = log 2 whatever the target t; so use a logit
    # of 2 in the object cell, where the target 0.5 gives -0.5 log s(2) - 0.5 log s(-2)
    logits[0, 2, 0, 0] = 2.0
    parts = multi_object_loss(pred, logits, boxes, has_obj, labels, w)
    sig = 1 / (1 + math.exp(-2.0))
    expected = (-0.5 * math.log(sig) - 0.5 * math.log(1 - sig) + 3 * math.log(2)) / 4
    assert parts["obj_loss"].item() == pytest.approx(expected, rel=1e-5)
    binary = multi_object_loss(pred, logits, boxes, has_obj, labels, LossWeights(box_loss="ciou"))
    assert binary["obj_loss"].item() == pytest.approx((-math.log(sig) + 3 * math.log(2)) / 4)
    # 1 - CIoU of the cell boxes: IoU 0.5, same centre, aspect ratios 1 (0.4 / 0.4 on the
    # cell-local frame... widths 0.1 / 0.2 and height 0.2 after cell_local): v term by hand
    iou = 0.5
    v = (4 / math.pi**2) * (math.atan(0.2 / 0.2) - math.atan(0.1 / 0.2)) ** 2
    alpha = v / (1 - iou + v)
    assert parts["box_loss"].item() == pytest.approx(1 - iou + alpha * v, rel=1e-4)
    with pytest.raises(ValueError, match="obj_target must be"):
        multi_object_loss(pred, logits, boxes, has_obj, labels, LossWeights(obj_target="soft"))


def test_iou_objectness_target_carries_no_gradient():
    """The IoU target is built from the model's own boxes: with only the objectness part weighted,
    no gradient may reach the predicted boxes (else the model would learn to move its boxes to
    please its objectness). The box part, weighted, does reach them: the graph is connected."""
    torch.manual_seed(0)
    s = 3
    boxes = torch.rand(2, 4, s, s) * 0.5 + 0.25
    has_obj = (torch.rand(2, s, s) > 0.5).to(torch.uint8)
    has_obj[0, 1, 1] = 1
    labels = torch.randint(0, 2, (2, s, s))
    logits = torch.randn(2, 3, s, s, requires_grad=True)
    only_obj = {"box_weight": 0.0, "class_weight": 0.0, "obj_weight": 1.0}
    for obj_loss in ("bce", "focal"):
        pred = (boxes + 0.1 * torch.randn_like(boxes)).clamp(0.05, 0.95).requires_grad_()
        w = LossWeights(box_loss="ciou", obj_loss=obj_loss, obj_target="iou", **only_obj)
        multi_object_loss(pred, logits, boxes, has_obj, labels, w)["loss"].backward()
        assert pred.grad is not None and torch.count_nonzero(pred.grad) == 0, obj_loss
        assert torch.count_nonzero(logits.grad[:, -1]) > 0  # objectness does learn
        pred.grad = None
        w = LossWeights(box_loss="ciou", obj_loss=obj_loss, obj_target="iou")
        multi_object_loss(pred, logits, boxes, has_obj, labels, w)["loss"].backward()
        assert torch.count_nonzero(pred.grad) > 0


def _two_objects():
    """S = 2, objects in cells (0, 0) and (1, 1), each predicted with half its width (IoU 0.5,
    same centre and height); the empty cells' boxes wrong too (they must not count); logits 0
    except class logits that make the cross-entropy differ from cell to cell."""
    s = 2
    boxes = torch.zeros(1, 4, s, s)
    has_obj = torch.zeros(1, s, s, dtype=torch.uint8)
    labels = torch.zeros(1, s, s, dtype=torch.int64)
    for i in range(s):
        boxes[0, :, i, i] = torch.tensor([0.5, 0.5, 0.4, 0.4])
        has_obj[0, i, i] = 1
    labels[0, 1, 1] = 1
    pred = boxes.clone()
    pred[0, 2, 0, 0] = pred[0, 2, 1, 1] = 0.2
    pred[0, :, 0, 1] = 0.9  # an empty cell, far off
    logits = torch.zeros(1, 3, s, s)
    logits[0, 0, 0, 0] = 2.0  # cell (0, 0), label 0: CE log(1 + e^-2); cell (1, 1): log 2
    logits[0, 0, 0, 1] = 5.0  # an empty cell: its CE must not count
    return pred, logits, boxes, has_obj, labels


def test_object_cells_are_averaged_by_hand_with_two_objects():
    pred, logits, boxes, has_obj, labels = _two_objects()
    parts = multi_object_loss(pred, logits, boxes, has_obj, labels, LossWeights())
    # SmoothL1 (beta 1) of a 0.2 error in one of 4 coordinates: 0.5 * 0.04 / 4, in both cells
    assert parts["box_loss"].item() == pytest.approx(0.005, rel=1e-5)
    ce = (math.log(1 + math.exp(-2.0)) + math.log(2)) / 2
    assert parts["class_loss"].item() == pytest.approx(ce, rel=1e-5)
    assert parts["obj_loss"].item() == pytest.approx(math.log(2), rel=1e-6)  # BCE of p = 0.5
    # 1 - CIoU in each object cell (IoU 0.5, same centre, widths 0.2 / 0.4, heights 0.4)
    v = (4 / math.pi**2) * (math.atan(0.4 / 0.4) - math.atan(0.2 / 0.4)) ** 2
    ciou = multi_object_loss(pred, logits, boxes, has_obj, labels, LossWeights(box_loss="ciou"))
    assert ciou["box_loss"].item() == pytest.approx(1 - 0.5 + v / (0.5 + v) * v, rel=1e-4)


def test_focal_objectness_uses_its_gamma_and_alpha():
    """torchvision's focal loss at p = 0.5: BCE log 2 times (1 - p_t)^gamma = 0.5^gamma, times
    alpha (object cells) or 1 - alpha (the others)."""
    pred, logits, boxes, has_obj, labels = _two_objects()
    for gamma, alpha in ((1.0, 0.5), (2.0, 0.25), (0.0, 0.75)):
        w = LossWeights(obj_loss="focal", focal_gamma=gamma, focal_alpha=alpha)
        parts = multi_object_loss(pred, logits, boxes, has_obj, labels, w)
        expected = math.log(2) * 0.5**gamma * (2 * alpha + 2 * (1 - alpha)) / 4
        assert parts["obj_loss"].item() == pytest.approx(expected, rel=1e-6), (gamma, alpha)


def test_iou_objectness_target_with_the_smooth_l1_box_loss():
    """The IoU target does not depend on the box loss: IoU 0.5 in both object cells; with
    objectness logit 2 there, BCE against 0.5 is -0.5 log s(2) - 0.5 log s(-2)."""
    pred, logits, boxes, has_obj, labels = _two_objects()
    logits[0, 2, 0, 0] = logits[0, 2, 1, 1] = 2.0
    w = LossWeights(box_loss="smooth_l1", obj_target="iou")
    parts = multi_object_loss(pred, logits, boxes, has_obj, labels, w)
    sig = 1 / (1 + math.exp(-2.0))
    expected = (2 * (-0.5 * math.log(sig) - 0.5 * math.log(1 - sig)) + 2 * math.log(2)) / 4
    assert parts["obj_loss"].item() == pytest.approx(expected, rel=1e-5)
    # float64 logits beside float32 boxes: the target takes the logits' dtype
    parts = multi_object_loss(pred, logits.double(), boxes, has_obj, labels, w)
    assert parts["obj_loss"].dtype == torch.float64
    assert parts["obj_loss"].item() == pytest.approx(expected, rel=1e-5)


def test_single_object_loss_by_hand_for_both_box_losses():
    pred = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.3, 0.3, 0.2, 0.2]])
    true = torch.tensor([[0.5, 0.5, 0.4, 0.4], [0.3, 0.3, 0.2, 0.2]])
    logits, labels = torch.zeros(2, 3), torch.tensor([0, 2])
    lab = single_object_loss(pred, logits, true, labels)
    # the lab's SmoothL1 over all 8 coordinates, bit for bit: one error of 0.2 -> 0.5 * 0.04 / 8
    assert torch.equal(lab["box_loss"], torch.nn.functional.smooth_l1_loss(pred, true))
    assert lab["box_loss"].item() == pytest.approx(0.0025, rel=1e-5)
    assert lab["class_loss"].item() == pytest.approx(math.log(3), rel=1e-6)
    # bit for bit, not just equal in value: on these boxes the mean of per-box means (what
    # box_loss("smooth_l1") gives) differs from the mean over all coordinates in the last bit
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(5, 4, generator=g), torch.rand(5, 4, generator=g)
    exact = single_object_loss(a, torch.zeros(5, 3), b, torch.zeros(5, dtype=torch.int64))
    assert torch.equal(exact["box_loss"], torch.nn.functional.smooth_l1_loss(a, b))
    assert not torch.equal(exact["box_loss"], box_loss(a, b, "smooth_l1").mean())
    ciou = single_object_loss(pred, logits, true, labels, LossWeights(box_loss="ciou"))
    v = (4 / math.pi**2) * (math.atan(0.4 / 0.4) - math.atan(0.2 / 0.4)) ** 2
    first = 1 - 0.5 + v / (0.5 + v) * v  # the second box is exact: 0
    assert ciou["box_loss"].item() == pytest.approx(first / 2, rel=1e-4)
    w = LossWeights(box_weight=2.0, class_weight=3.0, box_loss="ciou")
    weighted = single_object_loss(pred, logits, true, labels, w)
    total = 2 * weighted["box_loss"] + 3 * weighted["class_loss"]
    assert weighted["loss"].item() == pytest.approx(total.item(), rel=1e-6)
