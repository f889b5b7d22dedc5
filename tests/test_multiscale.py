"""Two feature levels (backbone.fine_layer): the trunk tapped at stride 16, both levels packed into
one cached tensor and unpacked exactly, objects split between the levels by scale, detections of
both levels merged before NMS, and extract / train_multi / evaluate_multi / predict with it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from conftest import evaluate_multi_and_predict, invoke, lab_heads
from typer.testing import CliRunner

from pipeline_lib.base.params import ParamsError, parse_params
from pipeline_lib.boxes.detection import Filtering, grid_detections
from pipeline_lib.boxes.geometry import ImageSpec
from pipeline_lib.boxes.gridcoding import encode_grid
from pipeline_lib.features.backbones import (
    BackboneError,
    backbone_units,
    load_backbone,
    pack_levels,
    run_levels,
    unpack_levels,
)
from pipeline_lib.models.checkpoints import load_checkpoint
from pipeline_lib.models.heads import PyramidGridHead, TwoLevelMlpHead
from pipeline_lib.models.targets import GridLevel, grid_levels


def test_pack_and_unpack_are_exact_inverses():
    torch.manual_seed(0)
    coarse, fine = torch.randn(2, 5, 3, 4), torch.randn(2, 3, 6, 8)
    packed = pack_levels(coarse, fine)
    assert packed.shape == (2, 5 + 4 * 3, 3, 4)
    # the fine level's 2 x 2 block at (0, 0) lands in the channels of main position (0, 0)
    assert packed[0, 5:9, 0, 0].tolist() == fine[0, 0, :2, :2].flatten().tolist()
    back_coarse, back_fine = unpack_levels(packed, 3)
    assert torch.equal(back_coarse, coarse) and torch.equal(back_fine, fine)
    with pytest.raises(BackboneError, match="multiple of 32"):
        pack_levels(torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 7, 7))


def test_lite0_levels_are_its_block_4_and_its_last_block():
    backbone = load_backbone("efficientnet_lite0", fine_layer="blocks.4")
    assert backbone.fine_channels == 112 and backbone.describe()["fine_layer"] == "blocks.4"
    assert "fine_layer" not in load_backbone("efficientnet_lite0").describe()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        coarse, fine = run_levels(backbone.module, "blocks.4", x)
        units = backbone_units(backbone.module)
        upto = [m for name, m in units[: [n for n, _ in units].index("blocks.4") + 1]]
        expected_fine = torch.nn.Sequential(*upto)(x)
        expected_coarse = backbone.module(x)
    assert coarse.shape == (1, 320, 7, 7) and fine.shape == (1, 112, 14, 14)
    assert torch.equal(fine, expected_fine) and torch.equal(coarse, expected_coarse)


def test_resnet_fine_level_is_the_end_of_layer3():
    backbone = load_backbone("resnet18", "layer4", "random", fine_layer="layer3")
    assert backbone.fine_channels == 256
    with torch.no_grad():
        coarse, fine = run_levels(backbone.module, "layer3", torch.randn(1, 3, 64, 64))
    assert coarse.shape == (1, 512, 2, 2) and fine.shape == (1, 256, 4, 4)


@pytest.mark.parametrize(
    ("backbone", "message"),
    [
        (
            {"name": "resnet18", "layer": "layer4", "fine_layer": "blocks.4"},
            "resnet18's stride-16 level is 'layer3'",
        ),
        (
            {"name": "squeezenet1_1", "layer": "features", "fine_layer": "features"},
            "a second level is available for efficientnet_lite0 (blocks.4)",
        ),
        (
            {"name": "efficientnet_lite0", "layer": "head", "fine_layer": "blocks.4"},
            "with their default layer only",
        ),
    ],
)
def test_fine_layer_params_are_checked(raw_params, backbone, message):
    raw_params["backbone"].update(backbone)
    with pytest.raises(ParamsError, match="backbone.fine_layer: ") as error:
        parse_params(raw_params)
    assert message in str(error.value)


def test_levels_split_objects_by_scale_by_hand():
    levels = grid_levels(7, 0.2)
    assert levels == [GridLevel(7, None, (0.2, float("inf"))), GridLevel(14, None, (0.0, 0.2))]
    assert grid_levels(7) == [GridLevel(7)]
    # scale sqrt(0.1 * 0.1) = 0.1 < 0.2: the fine grid; sqrt(0.5 * 0.3) = 0.387: the main grid
    encoded = torch.tensor([[0.30, 0.52, 0.1, 0.1], [0.30, 0.52, 0.5, 0.3]], dtype=torch.float64)
    labels = torch.tensor([1, 2])
    scale = (encoded[:, 2] * encoded[:, 3]).sqrt()
    small = scale < 0.2
    fine = encode_grid(encoded[small], labels[small], 14)
    coarse = encode_grid(encoded[~small], labels[~small], 7)
    has_fine, fine_labels = fine.has_obj, fine.labels
    has_coarse, coarse_labels = coarse.has_obj, coarse.labels
    # fine: column floor(0.30 * 14) = 4, row floor(0.52 * 14) = 7; main: column 2, row 3
    assert has_fine.nonzero().tolist() == [[7, 4]] and fine_labels[7, 4] == 1
    assert has_coarse.nonzero().tolist() == [[3, 2]] and coarse_labels[3, 2] == 2


def test_two_level_head_and_merged_nms():
    torch.manual_seed(0)
    head = TwoLevelMlpHead(
        (16 + 4 * 4, 2, 2), n_classes=3, fine_channels=4, num_cells=2, hidden=8
    ).eval()
    outputs = head(torch.randn(5, 32, 2, 2))
    assert [tuple(t.shape) for t in outputs] == [
        (5, 4, 2, 2),
        (5, 4, 2, 2),
        (5, 4, 4, 4),
        (5, 4, 4, 4),
    ]
    # the same box found by a main cell (0.9) and a fine cell (0.8): one detection after NMS
    coarse_boxes, fine_boxes = torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 4, 4)
    coarse_boxes[0, :, 0, 0] = torch.tensor([0.5, 0.5, 0.2, 0.2])  # centre (0.25, 0.25)
    fine_boxes[0, :, 1, 1] = torch.tensor([0.0, 0.0, 0.2, 0.2])  # (0 + 1) / 4 = 0.25
    coarse_logits, fine_logits = torch.full((1, 4, 2, 2), -20.0), torch.full((1, 4, 4, 4), -20.0)
    coarse_logits[0, 1, 0, 0], coarse_logits[0, 3, 0, 0] = 20.0, 2.1972  # sigmoid 0.9
    fine_logits[0, 1, 1, 1], fine_logits[0, 3, 1, 1] = 20.0, 1.3863  # sigmoid 0.8
    args = (
        [coarse_boxes, fine_boxes],
        [coarse_logits, fine_logits],
        [(100, 100)],
        ImageSpec("shrink", 64),
    )
    (merged,) = grid_detections(*args, Filtering(0.5, 0.5, 10))
    assert merged.labels.tolist() == [1] and merged.scores.tolist() == pytest.approx([0.9], 1e-3)
    assert merged.boxes[0].tolist() == pytest.approx([15.0, 15.0, 35.0, 35.0], abs=1e-4)
    (both,) = grid_detections(*args, Filtering(0.5, None, 10))
    assert both.scores.tolist() == pytest.approx([0.9, 0.8], abs=1e-3)


def test_stages_with_a_fine_level(trained, tmp_path, monkeypatch):
    from stages import extract, finetune, train

    folder = tmp_path / "project"
    shutil.copytree(trained, folder, ignore=shutil.ignore_patterns("reports"))
    params = yaml.safe_load((folder / "params.yaml").read_text())
    lab_heads(params)["backbone"]["fine_layer"] = "blocks.4"
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(folder)
    invoke(extract.app, [])
    features = json.loads((folder / "data/features/features.json").read_text())
    assert features["fine_layer"] == "blocks.4" and features["fine_channels"] == 112
    output = invoke(train.app, ["multi", "--no-progress"]).output
    assert "(7x7 and 14x14 cells)" in output
    checkpoint = load_checkpoint("models/multi.safetensors")
    assert isinstance(checkpoint.head, TwoLevelMlpHead)
    assert checkpoint.card.grid.fine_channels == 112 and checkpoint.card.grid.fine_below == 0.2
    metrics, found = evaluate_multi_and_predict(folder)
    assert 0.0 <= metrics["map"] <= 1.0 and 0.0 < metrics["recall_upper_bound"] <= 1.0
    assert len(found) > 0  # score 0: every cell of both levels before NMS has a score above it

    # the conv head on the same two levels: a pyramid, trained, evaluated and used alike
    params["head"]["grid_kind"], params["grid"]["assign"] = "conv", "neighbours"
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    invoke(train.app, ["multi", "--no-progress"])
    checkpoint = load_checkpoint("models/multi.safetensors")
    assert isinstance(checkpoint.head, PyramidGridHead)
    assert checkpoint.card.grid.assign == "neighbours" and checkpoint.card.grid.fine_below == 0.2
    metrics, found = evaluate_multi_and_predict(folder)
    assert 0.0 <= metrics["map"] <= 1.0
    assert len(found) > 0

    # fine-tuned on both levels: the fine one tapped inside the backbone as extraction taps it
    params["finetune"].update(enabled=True, epochs=1, workers=0, unfreeze=1)
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    invoke(finetune.app, ["train", "--no-progress"])
    invoke(finetune.app, ["evaluate"])
    tuned = load_checkpoint("models/finetuned/model.safetensors")
    assert tuned.card.grid == checkpoint.card.grid and tuned.backbone_state is not None
    assert isinstance(tuned.head, PyramidGridHead)
    compared = json.loads((folder / "reports/evaluate_finetune/metrics.json").read_text())
    assert compared["map_frozen"] == pytest.approx(metrics["map"], abs=0.05)
    params["finetune"]["enabled"] = False
    params["grid"]["anchors"] = 2
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    result = CliRunner().invoke(train.app, ["multi", "--no-progress"])
    assert result.exit_code == 1 and "params.yaml: grid.anchors: 2 with a second" in result.output
    params["grid"]["anchors"], params["image"]["size"] = 0, 200
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    result = CliRunner().invoke(extract.app, [])
    assert result.exit_code == 1 and "params.yaml: image.size: 200: backbone" in result.output
