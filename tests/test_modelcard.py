"""Model cards (modelcard.py): the committed models' descriptions read and written back byte for
byte (so model hashes do not move), and descriptions this pipeline cannot read refused by key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from pipeline_lib.boxes.geometry import ImageSpec
from pipeline_lib.models.modelcard import CardError, GridSpec, ModelCard

REPO = Path(__file__).resolve().parents[1]


def stored_description(path: Path) -> str:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()["pipeline"]


@pytest.mark.parametrize("model", ["single", "multi"])
def test_models_of_the_stages_read_and_write_back_byte_for_byte(trained, model):
    """The description the train stage wrote, read into a card and written again: the same bytes
    (so a model file's hash does not depend on the card's code)."""
    text = stored_description(trained / "models" / f"{model}.safetensors")
    card = ModelCard.from_dict(json.loads(text))
    assert json.dumps(card.to_dict()) == text
    assert card.kind == model and card.image == ImageSpec("shrink", 448)
    assert (card.grid is None) == (model == "single") and card.train["epochs"] == 2


@pytest.mark.parametrize("model", ["single", "multi"])
def test_the_committed_models_read_and_write_back_byte_for_byte(model):
    """The same for the default chain's models (where checked out: they are DVC outputs)."""
    path = REPO / "models" / f"{model}.safetensors"
    if not path.is_file():
        pytest.skip(f"{path} is not checked out (dvc pull or dvc repro)")
    text = stored_description(path)
    card = ModelCard.from_dict(json.loads(text))
    assert json.dumps(card.to_dict()) == text
    assert card.kind == model and card.image == ImageSpec("shrink", 448)
    # Lite0's last block: 320 channels; 448 / stride 32 = 14 cells
    assert card.feature_shape == [320, 14, 14] and card.feature_dtype == "float16"


def grid_card(**changes) -> dict:
    raw = {
        "kind": "multi",
        "head": {"hidden": 8, "dropout": 0.5},
        "num_cells": 7,
        "collisions": {"train": {"objects": 3, "dropped": 1}},
        "anchors": [[0.1, 0.2]],
        "classes": ["a", "b"],
        "feature_shape": [4, 7, 7],
        "feature_dtype": "float16",
        "backbone": {"name": "resnet18"},
        "image_mode": "crop",
        "image_size": 224,
        "train": {"best_epoch": 3},
    }
    return raw | changes


def test_fields_and_key_order():
    card = ModelCard.from_dict(grid_card())
    assert card.grid == GridSpec(7, [[0.1, 0.2]], 0, None) and card.image == ImageSpec("crop", 224)
    assert list(card.to_dict()) == list(grid_card())  # the historical order: the file's bytes
    assert card.to_dict() == grid_card()  # and every value
    tuned = ModelCard.from_dict(grid_card(finetuned={"epochs": 2}))
    assert list(tuned.to_dict())[-1] == "finetuned"
    assert tuned.to_dict() == grid_card(finetuned={"epochs": 2})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"format": 2}, "model description format 2: this pipeline reads format 1"),
        ({"kind": "triple"}, r"^unknown head kind 'triple' \(known: single, multi\)$"),
        ({"image_mode": "stretch"}, "unknown image mode 'stretch'"),
        ({"num_cells": "seven"}, "wrong value"),
    ],
)
def test_descriptions_it_cannot_read_are_refused(changes, message):
    with pytest.raises(CardError, match=message):
        ModelCard.from_dict(grid_card(**changes))


@pytest.mark.parametrize("key", ["classes", "feature_dtype", "backbone", "num_cells", "head"])
def test_a_missing_key_is_named(key):
    raw = grid_card()
    del raw[key]
    with pytest.raises(CardError, match=f"model description lacks '{key}'"):
        ModelCard.from_dict(raw)


def test_a_description_that_is_not_an_object_is_refused():
    with pytest.raises(CardError, match="not a JSON object"):
        ModelCard.from_dict(["kind", "multi"])
