"""The registry of head kinds: a card's (task, kind) -> its head; each head answers the contract."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from test_other_device import CARDS

from pipeline_lib.base.params import load_params
from pipeline_lib.boxes.detection import Filtering
from pipeline_lib.models.headkinds import HEAD_KINDS, build_head, head_kind
from pipeline_lib.models.losses import LossWeights


def test_a_card_without_a_kind_is_the_labs_and_builds_the_same_head():
    for name in ("single lab", "grid lab", "grid lab two levels"):
        card = CARDS[name]
        older = dataclasses.replace(card, head={k: v for k, v in card.head.items() if k != "kind"})
        torch.manual_seed(0)
        named = build_head(card)
        torch.manual_seed(0)
        unnamed = build_head(older)
        assert repr(named) == repr(unnamed)
        for a, b in zip(named.state_dict().values(), unnamed.state_dict().values(), strict=True):
            assert torch.equal(a, b)


def test_an_unknown_kind_names_the_kinds_of_its_task():
    card = dataclasses.replace(CARDS["grid conv"], head={"kind": "retina", "width": 8})
    with pytest.raises(ValueError, match=r"unknown multi-object head kind 'retina' \(known: lab, "):
        build_head(card)
    card = dataclasses.replace(CARDS["single lab"], head={"kind": "conv"})
    with pytest.raises(ValueError, match=r"\(known: lab, spatial\)$"):
        build_head(card)


@pytest.mark.parametrize("name", list(CARDS))
def test_every_head_decodes_its_own_outputs(name):
    """The contract's decoding, asked of the head: B images' detections in their own pixels."""
    card = CARDS[name]
    head = build_head(card).eval()
    features = torch.randn(2, *card.feature_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        found = head.detections(head(features), [(200, 100), (64, 64)], card.image, Filtering(0.0))
    assert len(found) == 2
    for image, (width, height) in zip(found, [(200, 100), (64, 64)], strict=True):
        assert len(image) >= 1 and image.boxes.shape == (len(image), 4)
        assert (image.boxes[:, 0::2] <= width + 1e-4).all()
        assert (image.boxes[:, 1::2] <= height + 1e-4).all()
        if card.kind == "single":  # one box per image, whatever `keep`
            assert len(image) == 1


NONE = (torch.zeros(0, 4, dtype=torch.float64), torch.zeros(0, dtype=torch.int64))
TWO = (
    torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.5, 0.5]], dtype=torch.float64),
    torch.tensor([0, 2]),
)


@pytest.mark.parametrize("name", [n for n, c in CARDS.items() if c.kind == "multi"])
def test_every_multi_head_learns_from_the_targets_its_kind_makes(name):
    """The contract end to end on one batch: the kind's targets, the head's objective."""
    card = CARDS[name]
    torch.manual_seed(0)
    head = build_head(card)
    targets = head_kind(card).targets(card, [TWO, NONE])
    assert all(len(t) == 2 for t in targets)  # a row per image
    features = torch.randn(2, *card.feature_shape, generator=torch.Generator().manual_seed(0))
    objective = head.objective(LossWeights())
    outputs = head(features)
    losses = objective.loss_fn(outputs, targets)
    losses["loss"].backward()
    total = float(losses["loss"].detach())
    assert math.isfinite(total) and total > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    with torch.no_grad():  # as loop.run_epoch measures
        measures = objective.measure_fn(outputs, targets)
    assert {"accuracy", "iou", "obj_accuracy"} <= set(measures)
    assert measures["accuracy"][1] >= 2  # both objects (at least) are matched somewhere


def test_every_kind_is_described_from_params_and_builds_from_its_card():
    """What params.yaml asks for (head.*, grid.*) -> the card's entry and layout -> the head."""
    params = load_params(Path(__file__).parents[1] / "params.yaml")
    for (task, name), kind in HEAD_KINDS.items():
        entry = kind.entry(params.head)
        assert entry["kind"] == name
        like = CARDS[next(n for n, c in CARDS.items() if (c.kind, c.head["kind"]) == (task, name))]
        card = dataclasses.replace(like, head=entry)
        if task == "multi":
            grid = dataclasses.replace(params.grid, num_cells=like.grid.num_cells)
            card.grid = kind.layout(grid, 0, like.feature_shape, None)
            assert card.grid.fine_channels == 0 and card.grid.num_cells == like.grid.num_cells
        assert isinstance(build_head(card), torch.nn.Module)
