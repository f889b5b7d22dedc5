"""What torchvision's detectors on the cached levels share (models/torchvision_heads.py): the
training measures over the locations their matching chose, by hand, and a head built from its
card (FCOS and RetinaNet each: test_fcos.py, test_retinanet.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pipeline_lib.models.torchvision_heads import builder, matched_measures


def test_the_measures_count_matched_locations_by_hand():
    # two images, three locations: image 0 matched object 0 at location 0 and object 1 at
    # location 2; image 1 ignored location 0 (-2) and matched its object 0 at location 1
    head = SimpleNamespace(
        head=SimpleNamespace(matched=[torch.tensor([0, -1, 1]), torch.tensor([-2, 0, -1])])
    )
    boxes = torch.tensor(
        [[[0, 0, 10, 10], [0, 0, 4, 4]], [[10, 10, 20, 20], [0, 0, 1, 1]]], dtype=torch.float32
    )
    labels = torch.tensor([[2, 1], [0, 0]])
    logits = torch.zeros(2, 3, 3)
    logits[0, 0, 2] = logits[0, 2, 0] = logits[1, 1, 0] = 1.0  # right, wrong (truth 1), right
    asked = []

    def decode(fg):
        asked.append(fg)
        # IoU 1 with [0, 0, 10, 10]; 8 / 16 with [0, 0, 4, 4]; 50 / 100 with [10, 10, 20, 20]
        return torch.tensor([[0, 0, 10, 10], [0, 0, 2, 4], [10, 10, 20, 15]], dtype=torch.float32)

    found = torch.tensor([[True, True, True], [False, True, False]])
    measures = matched_measures(head, logits, decode, found, (boxes, labels))
    assert asked[0].tolist() == [[True, False, True], [False, True, False]]
    assert measures == {
        "accuracy": (2.0, 3),
        "iou": (pytest.approx(2.0), 3),
        "obj_accuracy": (5.0, 6),  # found differs from matched at image 0, location 1 only
    }


def test_a_card_builds_its_class_with_its_entry_and_its_levels():
    made = []

    class Kind:
        def __init__(self, shape, n_classes, image_size, fine_channels, **config):
            made.append((shape, n_classes, image_size, fine_channels, config))

    card = SimpleNamespace(
        head={"kind": "k", "width": 32, "depth": 1},
        feature_shape=[1280, 14, 14],
        classes=["cat", "dog"],
        image=SimpleNamespace(size=448),
        grid=SimpleNamespace(fine_channels=112),
    )
    assert isinstance(builder(Kind)(card), Kind)
    assert made == [((1280, 14, 14), 2, 448, 112, {"width": 32, "depth": 1})]
