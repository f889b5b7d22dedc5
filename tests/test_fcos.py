"""torchvision's FCOS on the cached features (head.grid_kind: fcos): targets by hand, shapes of
one and two levels, a head that learns a box, and the stages training, evaluating and predicting
with it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import evaluate_multi_and_predict, invoke

from pipeline_lib.base.params import load_params
from pipeline_lib.boxes.detection import Filtering
from pipeline_lib.boxes.geometry import ImageSpec
from pipeline_lib.models.checkpoints import load_checkpoint
from pipeline_lib.models.fcos import FcosHead, fcos_entry
from pipeline_lib.models.modelcard import ModelCard
from pipeline_lib.models.targets import box_targets

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("fine", [0, 6])
def test_outputs_cover_every_location_of_each_level(fine):
    head = FcosHead((16 + 4 * fine, 4, 4), 3, 128, fine, width=32, depth=1)
    outputs = head(torch.randn(2, 16 + 4 * fine, 4, 4))
    locations = 16 + (64 if fine else 0)  # 4 x 4, and 8 x 8 for the fine level
    assert [tuple(t.shape) for t in outputs] == [
        (2, locations, 3),
        (2, locations, 4),
        (2, locations, 1),
    ]
    anchors = head.anchors(2, torch.device("cpu"))
    assert len(anchors) == 2 and anchors[0].shape == (locations, 4)
    # model files from before (no `centred`): the coarse level's first location a box of its
    # stride (32 pixels) centred on (0, 0), torchvision's AnchorGenerator placing location
    # (i, j) at (j, i) x stride, the cell's corner
    assert anchors[0][-16].tolist() == [-16.0, -16.0, 16.0, 16.0]
    assert anchors[0][-1].tolist() == [80.0, 80.0, 112.0, 112.0]  # (3, 3): centre 96, 96
    assert set(head.state_dict()) == {k for k in head.state_dict() if not k.startswith("_")}


def test_locations_sit_at_the_centres_of_their_cells():
    # the paper's location of cell (i, j): (floor(s / 2) + j s, floor(s / 2) + i s); a box of
    # the stride around it. Stride 32 (4 x 4 of 128) and 16 (the fine level's 8 x 8)
    head = FcosHead((16 + 4 * 6, 4, 4), 3, 128, 6, width=32, depth=1, centred=True)
    anchors = head.anchors(1, torch.device("cpu"))[0]
    assert anchors[0].tolist() == [0.0, 0.0, 16.0, 16.0]  # fine (0, 0): centre (8, 8)
    assert anchors[8 * 2 + 3].tolist() == [48.0, 32.0, 64.0, 48.0]  # fine (2, 3): (56, 40)
    assert anchors[64].tolist() == [0.0, 0.0, 32.0, 32.0]  # coarse (0, 0): centre (16, 16)
    assert anchors[-1].tolist() == [96.0, 96.0, 128.0, 128.0]  # coarse (3, 3): (112, 112)
    # the stage's heads are centred: params head.* give the card entry that says so
    assert fcos_entry(load_params(REPO / "params.yaml").head)["centred"] is True


def test_the_head_learns_a_box_and_decodes_it_to_the_original_pixels():
    torch.manual_seed(0)
    head = FcosHead((8, 4, 4), 2, 128, 0, width=32, depth=1)
    features = torch.randn(2, 8, 4, 4)
    card = ModelCard("multi", {}, ["a", "b"], [8, 4, 4], "float32", {}, ImageSpec("shrink", 128))
    targets = box_targets(
        card,
        [
            (torch.tensor([[0.5, 0.5, 0.5, 0.5]], dtype=torch.float64), torch.tensor([1])),
            (torch.tensor([[0.25, 0.25, 0.4, 0.4]], dtype=torch.float64), torch.tensor([0])),
        ],
    )
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    first = None
    for _ in range(150):
        losses = head.loss(head(features), targets)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        first = first or float(losses["loss"].detach())
    assert float(losses["loss"].detach()) < first / 3
    with torch.no_grad():
        measures = head.measures(head(features), targets)
    assert measures["accuracy"][0] == measures["accuracy"][1] > 0  # every matched location
    head.eval()
    with torch.no_grad():
        found = head.detections(
            head(features),
            [(256, 128), (256, 128)],
            ImageSpec("shrink", 128),
            Filtering(0.3, 0.5, 5),
        )
    # image 0's box, 64..192 x 32..96 in its 256 x 128 pixels, class 1, ranked first
    assert found[0].labels[0] == 1 and found[1].labels[0] == 0
    assert found[0].boxes[0].tolist() == pytest.approx([64.0, 32.0, 192.0, 96.0], abs=12)
    assert head.matched_objects(*targets) == 2


def test_stages_train_evaluate_and_predict_with_fcos(trained, tmp_path, monkeypatch):
    from stages import train

    folder = tmp_path / "project"
    shutil.copytree(trained, folder, ignore=shutil.ignore_patterns("reports"))
    params = yaml.safe_load((folder / "params.yaml").read_text())
    params["head"].update(grid_kind="fcos", tower_width=32, tower_depth=1)
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(folder)
    output = invoke(train.app, ["multi", "--no-progress"]).output
    assert "objects get no place in the head's assignment" in output  # FCOS: no location
    checkpoint = load_checkpoint("models/multi.safetensors")
    assert isinstance(checkpoint.head, FcosHead)
    assert checkpoint.card.head == {"kind": "fcos", "width": 32, "depth": 1, "centred": True}
    metrics, found = evaluate_multi_and_predict(folder)
    assert 0.0 <= metrics["map"] <= 1.0 and 0.0 < metrics["recall_upper_bound"] <= 1.0
    assert found and all(0 <= d["xmin"] <= d["xmax"] for d in found)
