"""Single-object task: largest-object targets, box encoding, head, training loop, checkpoints."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from pipeline_lib.base.errors import PipelineError
from pipeline_lib.boxes.geometry import (
    IMAGE_MODES,
    ImageSpec,
    encode_boxes,
    encoded_to_image,
    largest_box,
    output_size,
    paired_iou,
    transform_boxes,
)
from pipeline_lib.data.voc import VOC_CLASSES, parse_annotation
from pipeline_lib.measures.metrics import (
    confusion_matrix,
    single_object_batch_sums,
    single_object_metrics,
)
from pipeline_lib.models.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from pipeline_lib.models.heads import MlpSingleHead
from pipeline_lib.models.losses import Objective, single_object_loss
from pipeline_lib.models.modelcard import ModelCard
from pipeline_lib.models.targets import single_object_targets
from pipeline_lib.training.loop import Dataset, TrainConfig, fit, predict, seed_everything


def tables(image_id: str, width: int, height: int, objects: list[tuple]) -> tuple:
    """Prepared-like tables for one image; objects are (class_id, xmin, ymin, xmax, ymax)."""
    images = pd.DataFrame([{"image_id": image_id, "width": width, "height": height}])
    rows = [
        dict(zip(["class_id", "xmin", "ymin", "xmax", "ymax"], o, strict=True))
        | {"image_id": image_id}
        for o in objects
    ]
    return images, pd.DataFrame(rows)


def test_lab_example_largest_object():
    # The lab's example, as encoded (cx, cy, w, h) fractions of the image.
    encoded = torch.tensor(
        [
            [0.524, 0.5735294117647058, 0.836, 0.753393665158371],
            [0.447, 0.23868778280542988, 0.262, 0.27828054298642535],
        ]
    )
    assert largest_box(encoded) == 0
    # The same objects as VOC pixel boxes of a 500 x 442 image, derived by hand:
    # cx 0.524 * 500 = 262, w 0.836 * 500 = 418 -> x 53..471; cy * 442 = 253.5, h * 442 = 333
    # -> y 87..420; second: x 223.5 -/+ 65.5 -> 158..289, y 105.5 -/+ 61.5 -> 44..167.
    images, objects = tables("lab", 500, 442, [(5, 53, 87, 471, 420), (0, 158, 44, 289, 167)])
    targets = single_object_targets(images, objects, ["lab"], ImageSpec("none", 224))
    expected = torch.tensor([[0.5240, 0.5735, 0.8360, 0.7534]])
    assert torch.allclose(targets.boxes, expected, atol=5e-5)
    assert torch.allclose(targets.boxes, encoded[:1], atol=1e-7)
    assert targets.labels.tolist() == [5] and targets.present.tolist() == [True]


def test_real_voc_file_encoded_by_hand(shared_voc):
    """000009.xml (500 x 375): horse (69,172)-(270,330) 201 x 158 = 31758 px^2 beats the persons
    (79 x 143 = 11297, 42 x 130, 39 x 131)."""
    class_ids = {name: k for k, name in enumerate(VOC_CLASSES)}
    image, objects = parse_annotation(shared_voc / "Annotations" / "000009.xml", class_ids)
    images, objects = pd.DataFrame([image | {"image_id": "000009"}]), pd.DataFrame(objects)
    objects["image_id"] = "000009"
    horse = VOC_CLASSES.index("horse")
    shrink = single_object_targets(images, objects, ["000009"], ImageSpec("shrink", 224))
    # shrink scales both axes, so the fractions are the original ones:
    # cx = (69 + 270) / 2 / 500, cy = (172 + 330) / 2 / 375, w = 201 / 500, h = 158 / 375
    expected = torch.tensor([[0.339, 251 / 375, 0.402, 158 / 375]])
    assert torch.allclose(shrink.boxes, expected, atol=1e-6)
    assert shrink.labels.tolist() == [horse]
    # crop 224: window at left = round(276 / 2) = 138, top = round(151 / 2) = 76 (half to even);
    # horse -> (-69, 96, 132, 254) clipped to (0, 96, 132, 224): 132 x 128 still the largest.
    crop = single_object_targets(images, objects, ["000009"], ImageSpec("crop", 224))
    expected = torch.tensor([[66 / 224, 160 / 224, 132 / 224, 128 / 224]])
    assert torch.allclose(crop.boxes, expected, atol=1e-6)
    assert crop.labels.tolist() == [horse]


def test_no_object_left_is_marked_absent():
    # crop 100 of a 400 x 400 image keeps 150..250: the only box lies outside the window.
    images, objects = tables("x", 400, 400, [(1, 0, 0, 50, 50)])
    targets = single_object_targets(images, objects, ["x", "missing"], ImageSpec("crop", 100))
    assert targets.present.tolist() == [False, False]


@pytest.mark.parametrize("mode", IMAGE_MODES)
def test_encode_decode_round_trip(mode):
    torch.manual_seed(0)
    width, height, size = 500, 333, 224
    xy = torch.rand(50, 2) * torch.tensor([width - 20, height - 20])
    boxes = torch.cat([xy, xy + 5 + torch.rand(50, 2) * 200], dim=1).double()
    boxes = boxes.minimum(torch.tensor([width, height, width, height], dtype=torch.float64))
    out, keep = transform_boxes(boxes, width, height, mode, size)
    encoded = encode_boxes(out, *output_size(width, height, mode, size))
    back = encoded_to_image(encoded, width, height, mode, size)
    if mode == "crop":  # the part of each kept box inside the window comes back
        assert 0 < keep.sum() < len(boxes)
        left, top = 138, 54  # round(276 / 2), round(109 / 2) = round(54.5) -> 54 (half to even)
        window = torch.tensor([left, top, left + size, top + size], dtype=torch.float64)
        inside = [boxes[keep, :2].maximum(window[:2]), boxes[keep, 2:].minimum(window[2:])]
        boxes = torch.cat(inside, dim=1)
    assert torch.allclose(back, boxes, atol=1e-9)


def test_paired_iou_by_hand():
    a = torch.tensor([[0.0, 0, 2, 2], [0, 0, 1, 1], [0, 0, 1, 1]])
    b = torch.tensor([[1.0, 1, 3, 3], [0, 0, 1, 1], [2, 2, 3, 3]])
    assert torch.allclose(paired_iou(a, b), torch.tensor([1 / 7, 1.0, 0.0]))


def test_confusion_matrix_and_metrics_by_hand():
    classes = ["a", "b", "c"]
    labels = torch.tensor([0, 0, 1, 2])
    logits = torch.tensor([[5.0, 0, 0], [0, 5, 0], [0, 5, 0], [0, 0, 5]])
    assert confusion_matrix(labels, logits.argmax(1), 3).tolist() == [
        [1, 1, 0],
        [0, 1, 0],
        [0, 0, 1],
    ]
    boxes = torch.tensor([[0.5, 0.5, 0.5, 0.5]]).repeat(4, 1)
    # image 2's prediction is shifted by half a width: IoU (0.25 * 0.5) / (2 * 0.25 - 0.125) = 1/3
    pred = boxes.clone()
    pred[2, 0] = 0.75
    m = single_object_metrics(pred, logits, boxes, labels, classes)
    assert m["accuracy"] == 0.75 and m["hit_rate"] == 0.5  # image 1 wrong class, image 2 IoU 1/3
    assert m["mean_iou"] == round((3 + 1 / 3) / 4, 4)
    assert m["per_class_accuracy"] == {"a": 0.5, "b": 1.0, "c": 1.0}
    # SmoothL1 (beta 1) over 16 coordinates, one off by 0.25: 0.5 * 0.25^2 / 16
    assert m["box_loss"] == pytest.approx(0.5 * 0.0625 / 16, abs=1e-6)


def learnable_data(n: int, n_classes: int = 4, seed: int = 0) -> Dataset:
    """Features whose channels announce the class and whose spatial peak sits at the box centre."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, n_classes, (n,), generator=g)
    cells = torch.randint(0, 4, (n, 2), generator=g)
    features = torch.randn(n, 8, 4, 4, generator=g) * 0.5
    features[torch.arange(n), labels] += 1.5
    features[torch.arange(n), 7, cells[:, 0], cells[:, 1]] += 3.0
    centre = (cells.flip(1).float() + 0.5) / 4
    boxes = torch.cat([centre, torch.full((n, 2), 0.3)], dim=1)
    return Dataset(features.half(), (boxes, labels))


def train_tiny(epochs=15, seed=0, classifier="pooled"):
    seed_everything(seed)
    head = MlpSingleHead((8, 4, 4), 4, hidden=32, dropout=0.1, classifier=classifier)
    config = TrainConfig(epochs=epochs, batch_size=16, lr=3e-3, weight_decay=0.0, seed=seed)

    def loss_fn(outputs, targets):
        return single_object_loss(*outputs, *targets)

    train, val = learnable_data(128), learnable_data(64, seed=1)
    objective = Objective(loss_fn, single_object_batch_sums)
    result = fit(head, train, val, objective, config, progress=False)
    return head, result, train


@pytest.mark.parametrize("classifier", ["pooled", "flatten"])
def test_head_learns_clearly_better_than_chance(classifier):
    head, result, train = train_tiny(classifier=classifier)
    first, last = result.history[0]["train"], result.history[-1]["train"]
    assert last["accuracy"] > 0.8  # chance: 0.25
    assert last["box_loss"] < first["box_loss"] / 2
    assert result.history[result.best_epoch - 1]["val"]["accuracy"] > 0.6


def tiny_card() -> dict:
    """The description of `train_tiny`'s head, as a model file stores it."""
    return {
        "kind": "single",
        "head": {"hidden": 32, "dropout": 0.1, "classifier": "pooled", "classifier_dropout": 0.0},
        "classes": ["a", "b", "c", "d"],
        "feature_shape": [8, 4, 4],
        "feature_dtype": "float16",
        "backbone": {"name": "resnet18"},
        "image_mode": "shrink",
        "image_size": 128,
        "train": {},
    }


def test_same_seed_same_numbers_and_checkpoint_round_trip(tmp_path):
    head_a, a, train = train_tiny(epochs=3)
    _, b, _ = train_tiny(epochs=3)
    assert a.history == b.history and a.best_epoch == b.best_epoch
    head_a.load_state_dict(a.best_state)
    info = tiny_card()
    path = tmp_path / "single.safetensors"
    save_checkpoint(path, head_a, ModelCard.from_dict(info))
    loaded = load_checkpoint(path)
    assert loaded.card.to_dict() == info and not loaded.head.training
    for x, y in zip(
        predict(head_a, train.features), predict(loaded.head, train.features), strict=True
    ):
        assert torch.equal(x, y)


def test_single_object_metrics_exactly_by_hand():
    # image 0: class a, box exact; image 1: class b, a box half as wide at the same centre, IoU
    # exactly 0.5 (a hit at 0.5); image 2: class b predicted a, box exact. Class c: no image.
    boxes = torch.tensor([[0.5, 0.5, 0.5, 0.5]]).repeat(3, 1)
    pred = boxes.clone()
    pred[1, 2] = 0.25
    labels = torch.tensor([0, 1, 1])
    third = math.log(3.0)  # softmax of (ln 3, 0, 0) = (3/5, 1/5, 1/5)
    logits = torch.tensor([[third, 0, 0], [0, third, 0], [third, 0, 0]])
    m = single_object_metrics(pred, logits, boxes, labels, ["a", "b", "c"], iou_threshold=0.5)
    assert m == {
        "images": 3,
        "box_loss": round(0.5 * 0.25**2 / 12, 6),  # SmoothL1 over 12 coordinates: 0.002604
        "class_loss": round((2 * -math.log(0.6) - math.log(0.2)) / 3, 4),  # 0.877
        "accuracy": 0.6667,
        "mean_iou": 0.8333,
        "hit_rate": 0.6667,  # images 0 and 1: right class and IoU >= 0.5
        "per_class_accuracy": {"a": 1.0, "b": 0.5, "c": None},
    }
    thirds = single_object_metrics(pred, logits, boxes, torch.tensor([1, 1, 1]), ["a", "b"])
    assert thirds["per_class_accuracy"] == {"a": None, "b": 0.3333}  # 1 of 3, to 4 digits
    assert single_object_metrics(pred, logits, boxes, labels, ["a", "b", "c"], 0.6)[
        "hit_rate"
    ] == round(1 / 3, 4)


def test_largest_box_is_by_area_and_the_first_of_equals():
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.8], [0.5, 0.5, 0.8, 0.3], [0.5, 0.5, 0.9, 0.1]])
    assert largest_box(boxes) == 1  # areas 0.16, 0.24, 0.09 (not the widest-for-its-height)
    assert largest_box(torch.tensor([[0.1, 0.1, 0.4, 0.4], [0.7, 0.7, 0.4, 0.4]])) == 0
    assert largest_box(torch.tensor([[0.5, 0.5, 0.1, 0.1]])) == 0
    with pytest.raises(ValueError) as info:
        largest_box(torch.zeros(0, 4))
    assert str(info.value) == "largest_box: no boxes"


def test_batches_of_one_sample_are_refused_before_training():
    # BatchNorm cannot train on one sample: such batches are skipped, so one training sample (or
    # train.batch_size 1) would leave every epoch without a training figure.
    head = MlpSingleHead((8, 4, 4), 4, hidden=32)
    config = TrainConfig(epochs=1, batch_size=16, lr=1e-3, weight_decay=0.0)

    def loss_fn(outputs, targets):
        return single_object_loss(*outputs, *targets)

    objective = Objective(loss_fn, single_object_batch_sums)
    one, some = learnable_data(1), learnable_data(8)
    with pytest.raises(PipelineError, match="one training sample"):
        fit(head, one, some, objective, config, progress=False)
    config.batch_size = 1
    with pytest.raises(PipelineError, match="batch size 1"):
        fit(head, some, some, objective, config, progress=False)
    config.batch_size = 7  # 8 samples: a last batch of one is skipped, the epoch still counts
    result = fit(head, some, some, objective, config, progress=False)
    assert set(result.history[0]["train"]) >= {"loss", "accuracy", "iou"}


def test_bad_model_files_are_refused(tmp_path):
    head = MlpSingleHead((8, 4, 4), 4, hidden=32)
    info = tiny_card()
    good = tmp_path / "good.safetensors"
    save_checkpoint(good, head, ModelCard.from_dict(info))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    pickle = tmp_path / "pickle.safetensors"
    torch.save(head.state_dict(), pickle)
    foreign = tmp_path / "foreign.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(foreign))
    wrong = tmp_path / "wrong.safetensors"
    save_checkpoint(wrong, head, ModelCard.from_dict(info | {"feature_shape": [8, 2, 2]}))
    for path, words in [
        (tmp_path / "none.safetensors", "no such model file"),
        (truncated, "not a readable"),
        (pickle, "not a readable"),
        (foreign, "not a model of this pipeline"),
        (wrong, "does not fit its tensors"),
    ]:
        with pytest.raises(CheckpointError, match=words) as error:
            load_checkpoint(path)
        assert path.name in str(error.value)


def test_monitor_last_keeps_the_last_epoch_whatever_val_says():
    objective = Objective(lambda o, t: single_object_loss(*o, *t), single_object_batch_sums)

    def run(monitor):
        seed_everything(0)
        head = MlpSingleHead((8, 4, 4), 4, hidden=32, dropout=0.1)
        # lr 1.0: val loss is lowest after epoch 1, then rises
        config = TrainConfig(epochs=3, batch_size=16, lr=1.0, weight_decay=0.0, monitor=monitor)
        train, val = learnable_data(64), learnable_data(32, seed=1)
        return head, fit(head, train, val, objective, config, progress=False)

    assert run("loss")[1].best_epoch == 1
    head, result = run("last")
    assert result.best_epoch == 3
    assert result.best_monitor == result.history[-1]["val"]["loss"]
    for name, tensor in head.state_dict().items():
        assert torch.equal(result.best_state[name], tensor), name
