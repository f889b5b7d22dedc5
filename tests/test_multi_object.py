"""Multi-object task: grid targets, grid head, decoding + NMS, and VOC average precision."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from pipeline_lib.detection import cell_scores, decode_image, grid_to_encoded
from pipeline_lib.heads import MultiObjectHead
from pipeline_lib.losses import multi_object_loss
from pipeline_lib.metrics import all_point_ap, mean_ap, voc_average_precision
from pipeline_lib.targets import grid_targets, multi_object_targets, targets_to_grid_cell_tensor


def test_lab_grid_example():
    objects = [
        {"bndbox": {"cx": 0.60, "cy": 0.65, "width": 0.84, "height": 0.75}, "class": 5},
        {"bndbox": {"cx": 0.40, "cy": 0.20, "width": 0.26, "height": 0.27}, "class": 0},
    ]
    bboxes, has_obj, labels = targets_to_grid_cell_tensor(objects, 4)
    expected = torch.zeros(4, 4, 4)
    expected[:, 0, 1] = torch.tensor([0.60, 0.80, 0.26, 0.27])
    expected[:, 2, 2] = torch.tensor([0.40, 0.60, 0.84, 0.75])
    assert bboxes.dtype == torch.float32 and torch.equal(bboxes, expected)
    assert has_obj.dtype == torch.uint8
    assert has_obj.tolist() == [[0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert labels.dtype == torch.int32
    assert labels.tolist() == [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 5, 0], [0, 0, 0, 0]]


def test_collisions_later_wins_and_edges_go_to_the_last_cell():
    encoded = torch.tensor([[0.1, 0.1, 0.2, 0.2], [0.2, 0.2, 0.3, 0.3], [1.0, 1.0, 0.1, 0.1]])
    boxes, has_obj, labels, dropped = grid_targets(encoded, torch.tensor([1, 2, 3]), 2)
    assert dropped == 1  # the first two share cell (0, 0): the second wins
    assert labels[0, 0] == 2 and torch.allclose(boxes[:, 0, 0], torch.tensor([0.4, 0.4, 0.3, 0.3]))
    assert labels[1, 1] == 3 and torch.allclose(boxes[:, 1, 1], torch.tensor([1.0, 1.0, 0.1, 0.1]))
    assert has_obj.sum() == 2


def test_grid_encode_decode_round_trip():
    """Objects of a 400 x 300 image under shrink -> grid -> decoded boxes in original pixels."""
    xyxy = torch.tensor([[10.0, 20, 110, 220], [200, 50, 390, 290], [150, 100, 180, 140]])
    images = pd.DataFrame([{"image_id": "a", "width": 400, "height": 300}])
    objects = pd.DataFrame(xyxy.numpy(), columns=["xmin", "ymin", "xmax", "ymax"])
    objects["image_id"], objects["class_id"] = "a", [0, 1, 2]
    t = multi_object_targets(images, objects, ["a"], "shrink", 224, 7)
    assert t.objects.tolist() == [3] and t.dropped.tolist() == [0]
    logits = torch.full((1, 4, 7, 7), -20.0)
    logits[0, t.labels[0], torch.arange(7)[:, None], torch.arange(7)[None, :]] = 20.0
    logits[0, -1] = torch.where(t.has_obj[0].bool(), 20.0, -20.0)
    scores, labels = cell_scores(logits)
    det = decode_image(grid_to_encoded(t.boxes)[0], scores[0], labels[0], 400, 300, "shrink",
                       224, 0.5, 0.5, 100)  # fmt: skip
    order = torch.argsort(det.labels)
    assert det.labels[order].tolist() == [0, 1, 2]
    assert torch.allclose(det.boxes[order], xyxy, atol=1e-3)


def test_nms_removes_duplicates_per_class():
    encoded = torch.tensor([[0.5, 0.5, 0.4, 0.4], [0.51, 0.5, 0.4, 0.4], [0.5, 0.5, 0.4, 0.4]])
    scores, labels = torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0, 0, 1])
    before = decode_image(encoded, scores, labels, 100, 100, "none", 0, 0.2, None, 100)
    after = decode_image(encoded, scores, labels, 100, 100, "none", 0, 0.2, 0.5, 100)
    assert len(before) == 3
    assert after.scores.tolist() == pytest.approx([0.9, 0.7]) and after.labels.tolist() == [0, 1]
    assert len(decode_image(encoded, scores, labels, 100, 100, "none", 0, 0.85, 0.5, 100)) == 1


def test_grid_head_shapes_pooling_and_refusal():
    head = MultiObjectHead((16, 14, 14), 3, num_cells=7, hidden=8)
    boxes, logits = head(torch.randn(2, 16, 14, 14))
    assert boxes.shape == (2, 4, 7, 7) and logits.shape == (2, 4, 7, 7)
    assert boxes.min() >= 0 and boxes.max() <= 1
    with pytest.raises(ValueError, match="grid.num_cells 9 is larger than the 7x7 feature map"):
        MultiObjectHead((16, 7, 7), 3, num_cells=9)


@pytest.mark.parametrize("obj_loss", ["bce", "focal"])
def test_grid_loss_counts_object_cells_only_for_box_and_class(obj_loss):
    pred = torch.full((1, 4, 2, 2), 0.5)
    target = pred.clone()
    target[0, :, 1, 1] = 0.9  # wrong only in an empty cell: no box loss
    has_obj = torch.tensor([[[1, 0], [0, 0]]], dtype=torch.uint8)
    logits = torch.zeros(1, 3, 2, 2)
    labels = torch.zeros(1, 2, 2, dtype=torch.long)
    losses = multi_object_loss(pred, logits, target, has_obj, labels, obj_loss=obj_loss)
    assert losses["box_loss"] == 0
    assert losses["class_loss"] == pytest.approx(torch.log(torch.tensor(2.0)).item())
    assert losses["obj_loss"] > 0


def one_image(det_boxes, det_scores, det_labels, gt_boxes, gt_labels, gt_difficult=None):
    gt_difficult = gt_difficult or [False] * len(gt_labels)
    return (
        (torch.tensor(det_boxes, dtype=torch.float64).reshape(-1, 4), torch.tensor(det_scores),
         torch.tensor(det_labels, dtype=torch.long)),
        (torch.tensor(gt_boxes, dtype=torch.float64).reshape(-1, 4),
         torch.tensor(gt_labels, dtype=torch.long), torch.tensor(gt_difficult)),
    )  # fmt: skip


A, B, C, FAR = [0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50], [100, 100, 110, 110]


def ap_of(images, n_classes=1):
    dets, gts = zip(*images, strict=True)
    return voc_average_precision(list(dets), list(gts), n_classes)


def test_perfect_detections_give_ap_one():
    [c] = ap_of([one_image([A, B], [0.9, 0.8], [0, 0], [A, B], [0, 0])])
    assert c.ap == 1.0 and c.ap11 == 1.0


def test_false_positive_ranked_first():
    # ranked FP, TP, TP over 2 objects: recall 0, .5, 1; precision 0, .5, 2/3
    # all-point: envelope 2/3 over recall 0..1 -> 2/3; 11-point: 2/3 at every t -> 2/3
    [c] = ap_of([one_image([FAR, A, B], [0.9, 0.8, 0.7], [0, 0, 0], [A, B], [0, 0])])
    assert c.ap == pytest.approx(2 / 3) and c.ap11 == pytest.approx(2 / 3)
    assert c.precision == pytest.approx([0, 0.5, 2 / 3])


def test_eleven_point_and_all_point_differ_by_hand():
    # 3 objects, ranked TP, FP, TP: recall 1/3, 1/3, 2/3; precision 1, 1/2, 2/3
    # all-point: 1/3 * 1 + 1/3 * 2/3 + 1/3 * 0 = 5/9
    # 11-point: t = 0, .1, .2, .3 -> 1; t = .4, .5, .6 -> 2/3; t = .7 ... 1 -> 0: 6/11
    [c] = ap_of([one_image([A, FAR, B], [0.9, 0.8, 0.7], [0, 0, 0], [A, B, C], [0, 0, 0])])
    assert c.ap == pytest.approx(5 / 9) and c.ap11 == pytest.approx(6 / 11)
    recall, precision = torch.tensor([1 / 3, 1 / 3, 2 / 3]), torch.tensor([1, 0.5, 2 / 3])
    assert all_point_ap(recall, precision) == pytest.approx(5 / 9)


def test_difficult_objects_are_neither_true_nor_false_positives():
    images = [
        one_image([A], [0.9], [0], [A], [0]),
        one_image([B], [0.95], [0], [B], [0], [True]),  # detecting a difficult object: ignored
    ]
    [c] = ap_of(images)
    assert c.ap == 1.0 and c.positives == 1 and c.detections == 1


def test_duplicates_give_one_true_positive_then_false_positives():
    shifted = [1, 0, 11, 10]
    [c] = ap_of([one_image([A, shifted, A], [0.9, 0.8, 0.7], [0, 0, 0], [A, B], [0, 0])])
    assert c.precision == pytest.approx([1, 0.5, 1 / 3]) and c.recall == pytest.approx([0.5] * 3)
    assert c.ap == pytest.approx(0.5)


def test_class_absent_from_ground_truth_is_left_out_of_the_mean():
    per_class = ap_of([one_image([A, B], [0.9, 0.8], [0, 1], [A], [0])], n_classes=2)
    assert per_class[0].ap == 1.0 and per_class[1].ap is None and per_class[1].detections == 1
    assert mean_ap(per_class) == 1.0


def test_agrees_with_torchmetrics_on_random_detections():
    from torchmetrics.detection import MeanAveragePrecision

    g = torch.Generator().manual_seed(0)
    images, preds, targets = [], [], []
    for _ in range(20):
        n_gt = int(torch.randint(1, 5, (1,), generator=g))
        xy = torch.rand(n_gt, 2, generator=g) * 200
        gt = torch.cat([xy, xy + 20 + torch.rand(n_gt, 2, generator=g) * 80], dim=1)
        gt_labels = torch.randint(0, 3, (n_gt,), generator=g)
        jitter = (torch.rand(n_gt, 4, generator=g) - 0.5) * 30
        noise_xy = torch.rand(3, 2, generator=g) * 200
        noise = torch.cat([noise_xy, noise_xy + 40], dim=1)
        det = torch.cat([gt + jitter, noise])
        scores = torch.rand(len(det), generator=g)
        det_labels = torch.cat([gt_labels, torch.randint(0, 3, (3,), generator=g)])
        images.append(
            ((det, scores, det_labels), (gt, gt_labels, torch.zeros(n_gt, dtype=torch.bool)))
        )
        preds.append({"boxes": det.float(), "scores": scores.float(), "labels": det_labels})
        targets.append({"boxes": gt.float(), "labels": gt_labels})
    ours = mean_ap(ap_of(images, n_classes=3))
    metric = MeanAveragePrecision(iou_thresholds=[0.5], backend="faster_coco_eval")
    metric.update(preds, targets)
    theirs = float(metric.compute()["map_50"])
    assert 0.2 < ours < 0.95
    assert ours == pytest.approx(theirs, abs=0.02)  # COCO interpolates at 101 recall points
