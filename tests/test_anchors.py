"""Anchor boxes (grid.anchors): shape IoU, k-means priors, best-anchor assignment, the anchored
head and its decoding, and train_multi / evaluate_multi with anchors. Expected values are worked
out by hand in the comments."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import yaml
from conftest import invoke, lab_heads

from pipeline_lib.boxes.anchors import anchor_matches, best_anchor, kmeans_anchors, shape_iou
from pipeline_lib.boxes.detection import Filtering, cell_scores, grid_detections
from pipeline_lib.boxes.geometry import ImageSpec
from pipeline_lib.boxes.gridcoding import decode_grid
from pipeline_lib.data.tables import read_prepared
from pipeline_lib.models.checkpoints import load_checkpoint, save_checkpoint
from pipeline_lib.models.heads import MlpGridHead
from pipeline_lib.models.modelcard import ModelCard
from pipeline_lib.models.targets import GridLevel, multi_object_targets, training_shapes


def test_shape_iou_by_hand():
    # 0.2 x 0.1 vs 0.1 x 0.2 on one centre: overlap 0.1 x 0.1 = 0.01, union 0.02 + 0.02 - 0.01
    iou = shape_iou(torch.tensor([[0.2, 0.1]]), torch.tensor([[0.1, 0.2], [0.2, 0.1], [0.4, 0.2]]))
    assert iou[0].tolist() == pytest.approx([1 / 3, 1.0, 0.25])  # last: 0.02 / 0.08


def test_best_anchor_by_hand():
    anchors = torch.tensor([[0.1, 0.1], [0.4, 0.4], [0.8, 0.2]])
    # 0.35 x 0.3: IoU 0.01/0.105 = 0.095 | 0.105/0.16 = 0.656 | (0.35*0.2)/(0.105+0.16-0.07) = 0.36
    # 0.7 x 0.15: 0.01/0.105 | 0.06/(0.105+0.16-0.06) = 0.29 | 0.105/0.16 = 0.656
    # 0.05 x 0.05: 0.0025/0.01 = 0.25 | 0.0025/0.16 | 0.0025/0.16
    shapes = torch.tensor([[0.35, 0.3], [0.7, 0.15], [0.05, 0.05]])
    assert best_anchor(shapes, anchors).tolist() == [1, 2, 0]


def test_kmeans_finds_three_shape_clusters():
    small = [[0.05, 0.05], [0.06, 0.05], [0.05, 0.06]]
    wide = [[0.60, 0.14], [0.62, 0.14], [0.58, 0.14]]
    tall = [[0.15, 0.60], [0.15, 0.62], [0.15, 0.58]]
    shapes = torch.tensor(tall + small + wide)  # any order
    anchors, fitness = kmeans_anchors(shapes, 3)
    # the cluster means, sorted by area (wide 0.084 < tall 0.09)
    expected_anchors = [[0.16 / 3, 0.16 / 3], [0.60, 0.14], [0.15, 0.60]]
    torch.testing.assert_close(anchors, torch.tensor(expected_anchors, dtype=torch.float64))

    def iou(a, b):
        inter = min(a[0], b[0]) * min(a[1], b[1])
        return inter / (a[0] * a[1] + b[0] * b[1] - inter)

    expected = sum(max(iou(s, a) for a in anchors.tolist()) for s in shapes.tolist()) / 9
    assert fitness == pytest.approx(expected)
    torch.testing.assert_close(kmeans_anchors(shapes.flip(0), 3)[0], anchors)


def test_kmeans_edge_cases():
    shapes = torch.tensor([[0.1, 0.2], [0.3, 0.3]])
    assert kmeans_anchors(shapes, 1)[0][0].tolist() == pytest.approx([0.2, 0.25])  # the mean
    anchors, fitness = kmeans_anchors(shapes, 2)  # one anchor per box: a perfect fit
    torch.testing.assert_close(anchors, shapes.double())
    assert fitness == pytest.approx(1.0)
    with pytest.raises(ValueError, match="2 boxes cannot make 3 anchors"):
        kmeans_anchors(shapes, 3)
    with pytest.raises(ValueError, match="^box widths and heights must be positive$"):
        kmeans_anchors(torch.tensor([[0.1, 0.0]]), 1)
    with pytest.raises(ValueError, match="^k must be at least 1, got 0$"):
        kmeans_anchors(shapes, 0)


def test_kmeans_starts_at_the_shapes_of_rank_i_plus_half_n_over_k():
    """Without iterations the anchors are the starting centres: of 5 squares sorted by area, for
    k = 2 the ranks (i + 0.5) * 5 / 2 -> 1 and 3."""
    squares = torch.tensor([[5.0, 5], [1, 1], [4, 4], [2, 2], [3, 3]]) / 10
    anchors, _ = kmeans_anchors(squares, 2, max_iterations=0)
    assert anchors.flatten().tolist() == pytest.approx([0.2, 0.2, 0.4, 0.4])


def test_anchor_matches_by_yolov5s_ratio_rule():
    """An anchor fits when max(w / aw, aw / w, h / ah, ah / h) < ratio (strictly); the best-IoU
    anchor always does. Binary fractions: the ratios are exact."""
    anchors = torch.tensor([[0.125, 0.125], [0.5, 0.125], [0.0625, 0.5]])
    wh = torch.tensor([[0.5, 0.125], [0.25, 0.125], [0.0625, 0.0625]])
    expected = [
        [False, True, False],  # 4x the first anchor's width: not < 4; the second is exact
        [True, True, False],  # 2x the first's width, half the second's; the third: 4x, 1/4x
        [True, False, False],  # half the first anchor: fits; 8x narrower than the second
    ]
    assert anchor_matches(wh, anchors, 4.0).tolist() == expected
    # with a ratio of 4.5 the third anchor fits the second box too
    assert anchor_matches(wh, anchors, 4.5)[1].tolist() == [True, True, True]
    # a ratio of 1 keeps the best anchor only (the first of equal IoUs)
    assert anchor_matches(wh, anchors, 1.0).sum(dim=1).tolist() == [1, 1, 1]


def test_anchors_never_lower_the_recall_bound_on_voc(shared_voc, tmp_path):
    """Two objects collide with anchors only if they also collide without: on the genuine VOC2007
    subset the learnable objects can only grow."""
    from pipeline_lib.data.tables import write_prepared
    from pipeline_lib.data.voc import VOC_CLASSES, read_voc

    rows = read_voc(shared_voc, {"train": "train"}, VOC_CLASSES, progress=False)
    write_prepared(tmp_path, rows.images, rows.objects, {"classes": list(VOC_CLASSES)})
    prepared = read_prepared(tmp_path)
    ids = prepared.images["image_id"].tolist()
    plain = multi_object_targets(
        prepared.images, prepared.objects, ids, ImageSpec("shrink", 224), GridLevel(7)
    )
    shapes = training_shapes(prepared.images, prepared.objects, ids, ImageSpec("shrink", 224))
    assert len(shapes) == int(plain.objects.sum()) == len(prepared.objects)
    for k in (1, 3, 5):
        anchors = kmeans_anchors(shapes, k)[0].float()
        level = GridLevel(7, anchors)
        anchored = multi_object_targets(
            prepared.images, prepared.objects, ids, ImageSpec("shrink", 224), level
        )
        assert (anchored.dropped <= plain.dropped).all()
        if k == 1:  # one anchor: the same collisions as no anchor
            assert torch.equal(anchored.dropped, plain.dropped)
        else:
            assert anchored.dropped.sum() < plain.dropped.sum()


def _anchored_head(anchors):
    torch.manual_seed(0)
    return MlpGridHead((8, 3, 3), n_classes=4, num_cells=3, hidden=8, anchors=anchors).eval()


def test_anchored_head_starts_at_its_anchors():
    anchors = [[0.1, 0.2], [0.5, 0.4]]
    head = _anchored_head(anchors)
    boxes, logits = head(torch.randn(2, 8, 3, 3))
    assert boxes.shape == (2, 2, 4, 3, 3) and logits.shape == (2, 2, 5, 3, 3)
    with torch.no_grad():  # t = 0: sigmoid 0.5, so the centre of the cell and (2 * 0.5)^2 = 1
        head.regression[-2].weight.zero_()
        head.regression[-2].bias.zero_()
    boxes, _ = head(torch.randn(2, 8, 3, 3))
    assert torch.allclose(boxes[:, :, :2], torch.tensor(0.5))
    assert torch.allclose(boxes[:, 1, 2], torch.tensor(0.5)) and torch.allclose(
        boxes[:, 1, 3], torch.tensor(0.4)
    )
    with torch.no_grad():  # t large: sizes reach 4 x the anchor at most
        head.regression[-2].bias.fill_(50.0)
    boxes, _ = head(torch.randn(1, 8, 3, 3))
    assert boxes[0, 0, 2:, 0, 0].tolist() == pytest.approx([0.4, 0.8])


def test_anchored_decoding_order_and_values():
    # B = 1, A = 2, S = 2: slot index = a * 4 + i * 2 + j
    pred = torch.zeros(1, 2, 4, 2, 2)
    pred[0, 1, :, 1, 0] = torch.tensor([0.5, 0.25, 0.3, 0.2])  # anchor 1, row 1, column 0
    encoded = decode_grid(pred)
    assert encoded.shape == (1, 8, 4)
    # cx = (0.5 + 0) / 2, cy = (0.25 + 1) / 2
    assert encoded[0, 6].tolist() == pytest.approx([0.25, 0.625, 0.3, 0.2])
    logits = torch.full((1, 2, 3, 2, 2), -20.0)
    logits[0, 1, 1, 1, 0] = 20.0  # class 1 certain ...
    logits[0, 1, 2, 1, 0] = 0.0  # ... objectness 0.5
    scores, labels = cell_scores(logits)
    assert scores.shape == (1, 8) and scores[0, 6].item() == pytest.approx(0.5)
    assert labels[0, 6] == 1 and scores[0, :6].max() < 0.01
    (found,) = grid_detections(
        pred, logits, [(200, 100)], ImageSpec("shrink", 224), Filtering(0.2, 0.5, 10)
    )
    # (0.25, 0.625, 0.3, 0.2) of 200 x 100: x 20..80, y 52.5..72.5
    assert found.labels.tolist() == [1]
    assert found.boxes[0].tolist() == pytest.approx([20.0, 52.5, 80.0, 72.5])


def test_anchored_checkpoint_round_trip(tmp_path):
    anchors = [[0.1, 0.2], [0.5, 0.4]]
    head = _anchored_head(anchors)
    info = {
        "kind": "multi",
        "head": {"hidden": 8, "dropout": 0.5},
        "num_cells": 3,
        "anchors": anchors,
        "classes": list("abcd"),
        "feature_shape": [8, 3, 3],
        "feature_dtype": "float16",
        "backbone": {"name": "resnet18"},
        "image_mode": "shrink",
        "image_size": 96,
    }
    save_checkpoint(tmp_path / "m.safetensors", head, ModelCard.from_dict(info))
    loaded = load_checkpoint(tmp_path / "m.safetensors")
    x = torch.randn(2, 8, 3, 3)
    for mine, theirs in zip(head(x), loaded.head(x), strict=True):
        assert torch.equal(mine, theirs)
    torch.testing.assert_close(loaded.head.anchors, torch.tensor(anchors))


def test_train_and_evaluate_multi_with_anchors(trained, tmp_path, monkeypatch):
    """The real stages with grid.anchors: 2 on the tiny set: anchors fitted, stored with the
    model, and the recall bound they leave reported."""
    from stages import evaluate, train

    folder = tmp_path / "project"
    shutil.copytree(trained, folder, ignore=shutil.ignore_patterns("reports"))
    params = yaml.safe_load((folder / "params.yaml").read_text())
    lab_heads(params)["grid"]["anchors"] = 2
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(folder)
    output = invoke(train.app, ["multi", "--no-progress"]).output
    assert "anchors (w x h, image fractions) from k-means on" in output
    checkpoint = load_checkpoint("models/multi.safetensors")
    assert len(checkpoint.card.grid.anchors) == 2 and checkpoint.head.anchors.shape == (2, 2)
    prepared = read_prepared("data/prepared")
    train_ids = prepared.images.query("split == 'train'")["image_id"].tolist()
    shapes = training_shapes(
        prepared.images, prepared.objects, train_ids, ImageSpec("shrink", params["image"]["size"])
    )
    stored = torch.tensor(checkpoint.card.grid.anchors, dtype=torch.float64)
    torch.testing.assert_close(stored, kmeans_anchors(shapes, 2)[0], atol=1e-7, rtol=0)
    summary = json.loads((folder / "reports/train_multi/metrics.json").read_text())
    torch.testing.assert_close(
        torch.tensor(summary["anchors"], dtype=torch.float64), stored, atol=1e-4, rtol=0
    )
    invoke(evaluate.app, ["multi"])
    metrics = json.loads((folder / "reports/evaluate_multi/metrics.json").read_text())
    assert 0.0 <= metrics["map"] <= 1.0 and metrics["recall_upper_bound"] > 0
    assert os.path.getsize("models/multi.safetensors") > 0

    params["grid"]["anchors"] = 1000  # more than params allow
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    from typer.testing import CliRunner

    result = CliRunner().invoke(train.app, ["multi", "--no-progress"])
    assert result.exit_code != 0 and "grid.anchors" in result.output
