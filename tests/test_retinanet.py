"""torchvision's RetinaNet on the cached features (head.grid_kind: retinanet): its levels and
anchors by hand, the towers' depth, a head that learns a box, and the stages training,
evaluating, predicting and fine-tuning with it."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
import yaml
from conftest import evaluate_multi_and_predict, invoke

from pipeline_lib.boxes.detection import Filtering
from pipeline_lib.boxes.geometry import ImageSpec
from pipeline_lib.models.checkpoints import load_checkpoint
from pipeline_lib.models.losses import LossWeights
from pipeline_lib.models.modelcard import ModelCard
from pipeline_lib.models.retinanet import RetinaNetHead
from pipeline_lib.models.targets import box_targets

# 128 x 128 images seen as 4 x 4 maps of 8 channels, two classes; one object of class 1, centred
CARD = ModelCard("multi", {}, ["a", "b"], [8, 4, 4], "float32", {}, ImageSpec("shrink", 128))


def one_box() -> tuple[torch.Tensor, torch.Tensor]:
    """(tensors made at a test's call, not when mutmut's server imports the module)"""
    return torch.tensor([[0.5, 0.5, 0.5, 0.5]], dtype=torch.float64), torch.tensor([1])


@pytest.mark.parametrize("fine", [0, 6])
def test_levels_p6_p7_and_nine_anchors_per_location(fine):
    head = RetinaNetHead((16 + 4 * fine, 4, 4), 3, 128, fine, width=32, depth=1)
    # 4 x 4 (stride 32), P6 2 x 2 (64), P7 1 x 1 (128); with a fine level 8 x 8 (16) first
    assert head.grids == [(8, 8)] * bool(fine) + [(4, 4), (2, 2), (1, 1)]
    anchors = (64 * bool(fine) + 16 + 4 + 1) * 9
    cls_logits, regression = head(torch.randn(2, 16 + 4 * fine, 4, 4))
    assert cls_logits.shape == (2, anchors, 3) and regression.shape == (2, anchors, 4)
    boxes = head.anchors(2, torch.device("cpu"))
    assert len(boxes) == 2 and boxes[0].shape == (anchors, 4)
    # the stride-32 level's first anchor: side 4 x 32 = 128 at ratio h/w 1:2 (w 128 / sqrt(0.5),
    # h 128 sqrt(0.5): 181.02 x 90.51), centred on location (0, 0), rounded as torchvision does
    first = 64 * 9 if fine else 0
    assert boxes[0][first].tolist() == [-91.0, -45.0, 91.0, 45.0]
    # anchors run ratio by ratio, scale by scale: the 6th is 1:1 at 128 x 2^(2/3) = 203.19 -> 203
    assert boxes[0][first + 5].tolist() == [-102.0, -102.0, 102.0, 102.0]
    # P7's one location: side 4 x 128 = 512 at 1:1, the first scale (its 4th anchor)
    assert boxes[0][-9 + 3].tolist() == [-256.0, -256.0, 256.0, 256.0]
    # strides in whole pixels, as torchvision's AnchorGenerator computes them: 160-pixel images
    # (5 x 5 maps) give P6 3 x 3 of stride 160 // 3 = 53; its first location's 6th anchor (1:1,
    # 2^(2/3)) is round(4 x 53 x 1.5874) = 337 wide, halved and rounded to even: 168
    odd = RetinaNetHead((8, 5, 5), 3, 160, width=32, depth=1).anchors(1, torch.device("cpu"))[0]
    assert odd[25 * 9 + 5].tolist() == [-168.0, -168.0, 168.0, 168.0]


def test_head_depth_sets_the_towers_and_the_state_dict_holds_the_head_once():
    shallow = RetinaNetHead((8, 4, 4), 2, 128, width=32, depth=1).state_dict()
    deep = RetinaNetHead((8, 4, 4), 2, 128, width=32, depth=3).state_dict()
    towers = {k.split(".conv.")[1].split(".")[0] for k in deep if ".conv." in k}
    assert towers == {"0", "1", "2"}
    assert {k.split(".conv.")[1].split(".")[0] for k in shallow if ".conv." in k} == {"0"}
    assert not any(k.startswith("_") for k in deep)  # torchvision's RetinaNet is not a submodule


def test_the_head_learns_a_box_and_decodes_it_to_the_original_pixels():
    torch.manual_seed(0)
    head = RetinaNetHead((8, 4, 4), 2, 128, 0, width=32, depth=1)
    features = torch.randn(2, 8, 4, 4)
    objects = [
        (torch.tensor([[0.5, 0.5, 0.5, 0.5]], dtype=torch.float64), torch.tensor([1])),
        (torch.tensor([[0.25, 0.25, 0.4, 0.4]], dtype=torch.float64), torch.tensor([0])),
    ]
    targets = box_targets(CARD, objects)
    objective = head.objective(LossWeights())
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    first = None
    for _ in range(150):
        losses = objective.loss_fn(head(features), targets)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        first = first or float(losses["loss"].detach())
    assert float(losses["loss"].detach()) < first / 3
    assert float(losses["obj_loss"].detach()) == 0.0  # no objectness
    with torch.no_grad():
        measures = objective.measure_fn(head(features), targets)
    assert measures["accuracy"][0] == measures["accuracy"][1] > 0  # every matched anchor
    assert measures["iou"][0] / measures["iou"][1] > 0.5
    head.eval()
    with torch.no_grad():
        found = head.detections(
            head(features), [(256, 128)] * 2, ImageSpec("shrink", 128), Filtering(0.3, 0.5, 5)
        )
    # image 0's box, 64..192 x 32..96 in its 256 x 128 pixels, class 1, ranked first
    assert found[0].labels[0] == 1 and found[1].labels[0] == 0
    assert found[0].boxes[0].tolist() == pytest.approx([64.0, 32.0, 192.0, 96.0], abs=12)


def test_every_object_gets_an_anchor_even_a_tiny_one():
    """RetinaNet keeps each box's best anchors (low-quality matches): none is left out, however
    small (a 4-pixel box's best IoU with a 64-pixel anchor is far below 0.4)."""
    head = RetinaNetHead((8, 4, 4), 2, 128, 0, width=32, depth=1)
    tiny = torch.tensor([[0.5, 0.5, 4 / 128, 4 / 128], [0.2, 0.8, 0.3, 0.3]], dtype=torch.float64)
    none = (torch.zeros(0, 4, dtype=torch.float64), torch.zeros(0, dtype=torch.int64))
    assert head.matched_objects(*box_targets(CARD, [(tiny, torch.tensor([0, 1])), none])) == 2


def test_stages_train_evaluate_predict_and_finetune_with_retinanet(trained, tmp_path, monkeypatch):
    from stages import finetune, train

    folder = tmp_path / "project"
    shutil.copytree(trained, folder, ignore=shutil.ignore_patterns("reports"))
    params = yaml.safe_load((folder / "params.yaml").read_text())
    params["head"].update(grid_kind="retinanet", tower_width=32, tower_depth=1)
    params["train"]["epochs"] = 2
    params["finetune"].update(enabled=True, epochs=1, workers=0, unfreeze=1)
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(folder)
    invoke(train.app, ["multi", "--no-progress"])
    checkpoint = load_checkpoint("models/multi.safetensors")
    assert isinstance(checkpoint.head, RetinaNetHead) and checkpoint.card.head == {
        "kind": "retinanet",
        "width": 32,
        "depth": 1,
    }
    # an object loses its anchors only to another of the image with the same best anchors (on
    # this fixture's few coarse locations, some)
    collisions = checkpoint.card.collisions["train"]
    assert 0 <= collisions["dropped"] < collisions["objects"] / 4
    metrics, found = evaluate_multi_and_predict(folder)
    assert 0.0 <= metrics["map"] <= 1.0 and metrics["recall_upper_bound"] > 0.75
    assert found and all(0 <= d["xmin"] <= d["xmax"] for d in found)
    invoke(finetune.app, ["train", "--no-progress"])
    invoke(finetune.app, ["evaluate"])
    tuned = load_checkpoint("models/finetuned/model.safetensors")
    assert tuned.card.head == checkpoint.card.head and tuned.backbone_state is not None
    compared = yaml.safe_load((folder / "reports/evaluate_finetune/metrics.json").read_text())
    assert math.isfinite(compared["map"]) and compared["map_frozen"] == pytest.approx(
        metrics["map"], abs=0.05
    )


def test_defaults_one_level_128_wide_four_convolutions_and_the_loss_parts_named():
    """torchvision's RetinaNet head as it is by default; the loss's parts named as the grid
    heads name theirs (what the training curves plot): the sum, GIoU box, focal class, no
    objectness."""
    head = RetinaNetHead((8, 4, 4), 2, 128)
    assert head.grids == [(4, 4), (2, 2), (1, 1)]  # no fine level
    assert head.neck.layer_blocks[0][0].out_channels == 128
    for tower in (head.head.classification_head.conv, head.head.regression_head.conv):
        assert len(tower) == 4  # each a 3x3 convolution, GroupNorm of 32 groups, ReLU
        assert all(isinstance(unit[1], torch.nn.GroupNorm) for unit in tower)
        assert {unit[1].num_groups for unit in tower} == {32}
    losses = head.loss(head(torch.randn(1, 8, 4, 4)), box_targets(CARD, [one_box()]))
    assert set(losses) == {"loss", "box_loss", "class_loss", "obj_loss"}
    parts = {name: float(value.detach()) for name, value in losses.items()}
    assert parts["loss"] == pytest.approx(parts["box_loss"] + parts["class_loss"])
    assert parts["box_loss"] > 0 and parts["class_loss"] > 0


def test_an_anchor_counts_as_found_where_its_best_class_s_sigmoid_passes_0_5():
    """obj_accuracy: found (the best class logit > 0, sigmoid > 0.5) against matched. Logits
    exactly 0 everywhere (sigmoid 0.5): nothing found, so only the unmatched anchors count as
    right; 0.5 everywhere: everything found, only the matched ones right."""
    head = RetinaNetHead((8, 4, 4), 2, 128, width=64, depth=1)
    targets = box_targets(CARD, [one_box()])
    cls_logits, regression = head(torch.randn(1, 8, 4, 4))
    head.loss((cls_logits, regression), targets)  # records the matching
    matched = int((torch.stack(head.head.matched) >= 0).sum())
    anchors = cls_logits.shape[1]
    assert 0 < matched < anchors
    with torch.no_grad():  # as the training loop measures
        zeros = head.measures((torch.zeros_like(cls_logits), regression), targets)
        halves = head.measures((torch.full_like(cls_logits, 0.5), regression), targets)
    assert zeros["obj_accuracy"] == (anchors - matched, anchors)
    assert halves["obj_accuracy"] == (matched, anchors)
