"""The registry of head kinds: a card's (task, kind) -> its head; each head answers the contract."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_other_device import CARDS

from pipeline_lib.detection import Filtering
from pipeline_lib.headkinds import HEAD_KINDS, build_head, head_kind


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


def test_fine_tuning_takes_the_kinds_the_registry_says():
    assert {key for key, kind in HEAD_KINDS.items() if kind.finetunes} == {
        ("multi", "lab"),
        ("multi", "conv"),
    }
    assert not head_kind(CARDS["grid fcos two levels"]).finetunes
    assert head_kind(dataclasses.replace(CARDS["grid lab"], head={"hidden": 8})).finetunes
