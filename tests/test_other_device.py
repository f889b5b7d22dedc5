"""Device guard: everything that runs on a GPU runs here on another device than the CPU.

CI has no GPU. `other_device.py` gives a stand-in: tensors on OTHER hold CPU values but refuse to
meet a CPU tensor, as CUDA ones do ("Expected all tensors to be on the same device"). Each test
runs one path of the pipeline with its modules and inputs on OTHER — every head kind, every loss,
the targets, the decoding with NMS, the training measures, a training step, a fine-tuning step,
extraction and the inference path — and checks that it gives what the CPU gives (the values are
the same CPU kernels', so equal, or close where the optimiser differs). A tensor made on a fixed
device inside any of them fails here as it would on a GPU: `decode_grid_map` building its cell
offsets with a bare `torch.arange(height)` did (the crash of train_single on the first GPU run).
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from other_device import OTHER, Elsewhere, other_device, values
from PIL import Image, ImageDraw

from pipeline_lib.boxes.anchors import kmeans_anchors
from pipeline_lib.boxes.detection import Filtering, grid_detections, single_detections
from pipeline_lib.boxes.geometry import ImageSpec, encode_boxes
from pipeline_lib.boxes.gridcoding import decode_grid_map, encode_grid, encode_grid_yolo
from pipeline_lib.evaluation.inference import detect, load_detector, read_photo
from pipeline_lib.features.backbones import load_backbone
from pipeline_lib.features.extraction import ExtractSettings, extract_features
from pipeline_lib.features.featurefiles import read_features
from pipeline_lib.measures.metrics import multi_object_batch_sums, single_object_batch_sums
from pipeline_lib.models.checkpoints import load_checkpoint, save_checkpoint
from pipeline_lib.models.headkinds import HEAD_KINDS, build_head, head_kind
from pipeline_lib.models.losses import LossWeights, Objective, grid_loss, single_object_loss
from pipeline_lib.models.modelcard import GridSpec, ModelCard
from pipeline_lib.training.finetuning import (
    FineTuner,
    HeadTargets,
    ImageBatches,
    ObjectImages,
    augmentation,
)
from pipeline_lib.training.loop import Dataset, TrainConfig, fit

K, C, S, FINE = 3, 16, 4, 8  # classes, feature channels, grid cells, fine-level channels
ANCHORS = [[0.1, 0.2], [0.3, 0.3], [0.6, 0.5]]


def card(task: str, head: dict, anchors=None, fine: int = 0) -> ModelCard:
    """A model card for K classes on (C, S, S) features (packed with a fine level of `fine`
    channels), 128-pixel images, an S x S grid."""
    grid = GridSpec(S, anchors, fine, 0.2 if fine else None) if task == "multi" else None
    shape = [C + 4 * fine, S, S]
    classes = [f"c{k}" for k in range(K)]
    return ModelCard(task, head, classes, shape, "float32", {}, ImageSpec("shrink", 128), grid=grid)


# Every registered head kind (headkinds.HEAD_KINDS), built from its card as a model file would be,
# with anchors and on two levels where it has them: a kind added to the registry must be added here
# (test_every_registered_head_kind_is_guarded).
CARDS = {
    "single lab": card("single", {"kind": "lab", "hidden": 8, "dropout": 0.5}),
    "single spatial": card("single", {"kind": "spatial", "width": 8, "depth": 1, "dropout": 0.1}),
    "grid lab": card("multi", {"kind": "lab", "hidden": 8}),
    "grid lab anchors": card("multi", {"kind": "lab", "hidden": 8}, anchors=ANCHORS),
    "grid conv": card("multi", {"kind": "conv", "width": 8, "depth": 1, "dropout": 0.1}),
    "grid conv anchors": card("multi", {"kind": "conv", "width": 8, "depth": 1}, anchors=ANCHORS),
    "grid conv two levels": card("multi", {"kind": "conv", "width": 8, "depth": 1}, fine=FINE),
    "grid fcos two levels": card(
        "multi", {"kind": "fcos", "width": 32, "depth": 1, "centred": True}, fine=FINE
    ),
    "grid lab two levels": card("multi", {"kind": "lab", "hidden": 8}, fine=FINE),
    "grid retinanet": card("multi", {"kind": "retinanet", "width": 32, "depth": 1}),
}
HEADS = {name: (lambda c=c: build_head(c)) for name, c in CARDS.items()}


def test_every_registered_head_kind_is_guarded():
    assert {(c.kind, c.head["kind"]) for c in CARDS.values()} == set(HEAD_KINDS)


WEIGHTS = [
    LossWeights(),  # the lab's: SmoothL1, BCE, binary objectness
    LossWeights(box_loss="ciou", obj_loss="focal", obj_target="iou"),  # the default
]


def on_other(module_or_tensor):
    return module_or_tensor.to(OTHER)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """`a` (made on OTHER) holds exactly `b`'s values, and is on OTHER."""
    return isinstance(a, Elsewhere) and a.device == OTHER and torch.equal(values(a), b)


def features_for(name: str, batch: int = 4) -> torch.Tensor:
    channels = C + 4 * FINE if "two levels" in name else C
    return torch.randn(batch, channels, S, S, generator=torch.Generator().manual_seed(1))


def grid_targets(batch: int, anchors=None, levels=(S,)):
    """Targets of `batch` images with two boxes each, per level (boxes, has_obj, labels)."""
    generator = torch.Generator().manual_seed(2)
    targets = []
    for cells in levels:
        encoded = []
        for _ in range(batch):
            centres = 0.2 + 0.6 * torch.rand(2, 2, generator=generator)
            sizes = 0.1 + 0.3 * torch.rand(2, 2, generator=generator)
            fractions = torch.cat([centres, sizes], dim=1).double()
            encoded.append(encode_grid(fractions, torch.tensor([0, 2]), cells, anchors))
        targets += [torch.stack([getattr(e, f) for e in encoded]) for f in ("boxes", "has_obj")]
        targets.append(torch.stack([e.labels for e in encoded]))
    return targets


def test_the_stand_in_device_refuses_cpu_tensors_as_a_gpu_does():
    with other_device() as device:
        with pytest.raises(RuntimeError, match="same device"):
            torch.zeros(2, 3, device=device) + torch.arange(3)
        with pytest.raises(RuntimeError, match="same device"):  # a CPU tensor, device indices
            torch.arange(4.0)[torch.tensor([1, 2], device=device)]
        y = torch.zeros(4, device=device)
        with pytest.raises(RuntimeError, match="same device"):  # values put from the CPU
            y[torch.tensor([1, 2])] = torch.tensor([5.0, 6.0])
        y[torch.tensor([1, 2])] = 7.0  # CPU indices and a number: fine
        assert y.tolist() == [0.0, 7.0, 7.0, 0.0] and y[[0, 1]].tolist() == [0.0, 7.0]
        x = torch.arange(6.0, device=device).view(2, 3)
        assert x.device == device and (x + torch.tensor(1.0)).sum().item() == 21  # CPU scalar
        assert x[x > 2].tolist() == [3.0, 4.0, 5.0]  # values are there: masks, items
        assert torch.equal(x.cpu(), torch.arange(6.0).view(2, 3))
        with pytest.raises(RuntimeError, match="same device"):
            torch.cat([x, torch.zeros(1, 3)])


def test_decode_grid_map_makes_its_cell_offsets_on_the_inputs_device():
    """The crash of the first GPU run: decode_grid_map built its offsets on the CPU."""
    cells = torch.rand(2, 4, 3, 5)
    with other_device():
        decoded = decode_grid_map(on_other(cells))
    assert same(decoded, decode_grid_map(cells))


@pytest.mark.parametrize("name", list(HEADS))
def test_every_head_runs_forward_and_backward_on_another_device(name):
    torch.manual_seed(0)
    head = HEADS[name]().train()
    x = features_for(name)
    torch.manual_seed(3)
    expected = head(x)  # dropout draws from the global generator: seeded alike for both
    with other_device():
        moved = on_other(copy.deepcopy(head))  # a copy: `expected` holds the CPU weights' graph
        torch.manual_seed(3)
        outputs = moved(on_other(x))
        sum(o.float().sum() for o in outputs).backward()
    assert len(outputs) == len(expected)
    for got, want in zip(outputs, expected, strict=True):
        assert isinstance(got, Elsewhere) and torch.allclose(values(got), want, atol=1e-6)
    assert all(p.grad is not None and p.grad.device == OTHER for p in moved.parameters())


@pytest.mark.parametrize("weights", WEIGHTS, ids=["lab", "default"])
@pytest.mark.parametrize("layout", ["one level", "anchors", "two levels"])
def test_every_loss_and_measure_runs_on_another_device(weights, layout):
    batch, n_anchors = 3, len(ANCHORS) if layout == "anchors" else 0
    anchors = torch.tensor(ANCHORS) if n_anchors else None
    levels = (S, 2 * S) if layout == "two levels" else (S,)
    targets = grid_targets(batch, anchors, levels)
    generator = torch.Generator().manual_seed(4)
    outputs = []
    for cells in levels:
        slots = (n_anchors,) if n_anchors else ()
        outputs.append(torch.rand(batch, *slots, 4, cells, cells, generator=generator))
        outputs.append(torch.randn(batch, *slots, K + 1, cells, cells, generator=generator))
    outputs = [o.requires_grad_() for o in outputs]
    expected = grid_loss(outputs, targets, weights)
    with other_device():
        moved = [on_other(o.detach()).requires_grad_() for o in outputs]
        losses = grid_loss(moved, [on_other(t) for t in targets], weights)
        losses["loss"].backward()
        with torch.no_grad():  # as loop.run_epoch measures
            measures = multi_object_batch_sums(moved, [on_other(t) for t in targets])
    for part, value in expected.items():
        assert torch.allclose(values(losses[part]), value), part
    assert all(o.grad is not None and o.grad.device == OTHER for o in moved)
    with torch.no_grad():
        assert measures == multi_object_batch_sums(outputs, targets)


@pytest.mark.parametrize("name", ["grid fcos two levels", "grid retinanet"])
def test_torchvisions_detectors_loss_measures_and_decoding_run_on_another_device(name):
    """torchvision's FCOS and RetinaNet code (assignment, losses, decoding) fed from another
    device, through the head's objective."""
    torch.manual_seed(0)
    head = HEADS[name]()
    x = features_for(name)
    boxes = torch.tensor(
        [[[10.0, 20.0, 60.0, 90.0], [0, 0, 0, 0]]] * 2 + [[[5, 5, 120, 120]] * 2] * 2
    )
    targets = (boxes, torch.tensor([[1, -1], [2, -1], [0, 1], [2, 2]]))
    keep, sizes = Filtering(0.0, 0.5, 10), [(200, 100)] * 4
    objective = head.objective(WEIGHTS[1])
    expected = objective.loss_fn(head(x), targets)
    with torch.no_grad():
        measures = objective.measure_fn(head(x), targets)
        found = head.detections(head(x), sizes, ImageSpec("shrink", 128), keep)
    with other_device():
        moved = on_other(copy.deepcopy(head))
        on_objective = moved.objective(WEIGHTS[1])
        outputs = moved(on_other(x))
        losses = on_objective.loss_fn(outputs, tuple(on_other(t) for t in targets))
        losses["loss"].backward()
        with torch.no_grad():
            on_measures = on_objective.measure_fn(outputs, tuple(on_other(t) for t in targets))
            decoded = moved.detections(outputs, sizes, ImageSpec("shrink", 128), keep)
    for part, value in expected.items():
        assert torch.allclose(values(losses[part]), value, atol=1e-5), part
    assert on_measures == measures
    for got, want in zip(decoded, found, strict=True):
        assert len(want) > 0 and torch.allclose(values(got.boxes), want.boxes, atol=1e-4)


@pytest.mark.parametrize("weights", WEIGHTS, ids=["lab", "default"])
def test_the_single_object_loss_and_measures_run_on_another_device(weights):
    generator = torch.Generator().manual_seed(5)
    boxes = torch.rand(4, 4, generator=generator) * 0.5 + 0.25
    pred = torch.rand(4, 4, generator=generator) * 0.5 + 0.25
    logits, labels = torch.randn(4, K, generator=generator), torch.tensor([0, 1, 2, 1])
    expected = single_object_loss(pred, logits, boxes, labels, weights)
    with other_device():
        args = [on_other(t) for t in (pred, logits, boxes, labels)]
        losses = single_object_loss(*args, weights)
        measures = single_object_batch_sums(args[:2], args[2:])
    assert all(torch.allclose(values(losses[k]), v) for k, v in expected.items())
    assert measures == single_object_batch_sums((pred, logits), (boxes, labels))


def test_targets_and_anchor_priors_follow_their_inputs_device():
    fractions = torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.33, 0.41, 0.5, 0.2], [0.8, 0.7, 0.1, 0.1]])
    labels, anchors = torch.tensor([0, 1, 2]), torch.tensor(ANCHORS)
    shapes = torch.rand(40, 2, generator=torch.Generator().manual_seed(6)) * 0.5 + 0.05
    with other_device():
        moved = [on_other(t) for t in (fractions, labels, anchors)]
        found = [
            encode_grid(*moved[:2], S),
            encode_grid(*moved[:2], S, moved[2]),
            encode_grid_yolo(*moved[:2], S),
        ]
        priors, fitness = kmeans_anchors(on_other(shapes), 3)
    wanted = [
        encode_grid(fractions, labels, S),
        encode_grid(fractions, labels, S, anchors),
        encode_grid_yolo(fractions, labels, S),
    ]
    for got, want in zip(found, wanted, strict=True):
        assert got.dropped == want.dropped
        assert all(same(getattr(got, f), getattr(want, f)) for f in ("boxes", "has_obj", "labels"))
    assert same(priors, kmeans_anchors(shapes, 3)[0]) and fitness == kmeans_anchors(shapes, 3)[1]


@pytest.mark.parametrize("mode", ["shrink", "crop"])
@pytest.mark.parametrize("layout", ["one level", "anchors", "two levels"])
def test_decoding_and_nms_run_on_another_device(mode, layout):
    generator = torch.Generator().manual_seed(7)
    slots = (len(ANCHORS),) if layout == "anchors" else ()
    levels = (S, 2 * S) if layout == "two levels" else (S,)
    boxes = [torch.rand(2, *slots, 4, s, s, generator=generator) * 0.8 + 0.1 for s in levels]
    logits = [torch.randn(2, *slots, K + 1, s, s, generator=generator) for s in levels]
    sizes, spec = [(120, 90), (64, 200)], ImageSpec(mode, 96)
    keep = Filtering(score_threshold=0.1, nms_iou=0.5, max_detections=20)
    expected = grid_detections(boxes, logits, sizes, spec, keep)
    with other_device():
        found = grid_detections(
            [on_other(b) for b in boxes], [on_other(v) for v in logits], sizes, spec, keep
        )
    for got, want in zip(found, expected, strict=True):
        assert len(want) > 0
        assert all(same(g, w) for g, w in zip(got.as_tuple(), want.as_tuple(), strict=True))


@pytest.mark.parametrize("mode", ["shrink", "crop"])
def test_single_object_decoding_runs_on_another_device(mode):
    generator = torch.Generator().manual_seed(8)
    boxes, logits = torch.rand(2, 4, generator=generator), torch.randn(2, K, generator=generator)
    sizes, spec = [(120, 90), (64, 200)], ImageSpec(mode, 96)
    expected = single_detections(boxes, logits, sizes, spec)
    with other_device():
        found = single_detections(on_other(boxes), on_other(logits), sizes, spec)
    for got, want in zip(found, expected, strict=True):
        assert all(same(g, w) for g, w in zip(got.as_tuple(), want.as_tuple(), strict=True))


@pytest.mark.parametrize(("name", "ema"), [("single spatial", 0.0), ("grid conv", 0.9)])
def test_a_training_run_works_on_another_device(name, ema):
    """loop.fit with config.device OTHER: batches moved there, Adam and the EMA there, the
    kept state back on the CPU."""
    torch.manual_seed(0)
    head = HEADS[name]()
    x = features_for(name, batch=8)
    if name.startswith("single"):
        targets = (torch.rand(8, 4) * 0.5 + 0.25, torch.arange(8) % K)
        objective = Objective(lambda o, t: single_object_loss(*o, *t), single_object_batch_sums)
    else:
        targets = tuple(grid_targets(8))
        objective = Objective(lambda o, t: grid_loss(o, t, WEIGHTS[1]), multi_object_batch_sums)
    data = Dataset(x, targets)
    config = TrainConfig(2, 4, 1e-2, 1e-4, "cosine", 0, "last", str(OTHER), ema)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    with other_device():
        result = fit(head, data, data, objective, config, progress=False)
    assert result.best_epoch == 2 and len(result.history) == 2
    assert all(type(v) is torch.Tensor for v in result.best_state.values())  # back on the CPU
    assert all(math.isfinite(result.history[-1]["val"][k]) for k in ("loss", "accuracy"))
    changed = [k for k, v in result.best_state.items() if not torch.equal(v, before[k])]
    assert any(k.endswith("weight") for k in changed)
    assert all(type(p) is torch.nn.Parameter and p.device.type == "cpu" for p in head.parameters())


def _photos(folder, n=4, size=(80, 64)):
    """`n` small photos, each a coloured rectangle on grey, with its box as fractions."""
    paths, objects = [], []
    for k in range(n):
        image = Image.new("RGB", size, (128, 128, 128))
        box = (8 + 4 * k, 10, 50 + 4 * k, 50)
        ImageDraw.Draw(image).rectangle(box, fill=(200, 40 * k, 60))
        path = folder / f"{k}.jpg"
        image.save(path)
        paths.append(path)
        pixels = torch.tensor([box], dtype=torch.float64)
        objects.append((encode_boxes(pixels, *size), torch.tensor([k % K])))
    return paths, objects


LITE0 = (320, 112)  # Lite0's channels at its default layer and at blocks.4 (its fine level)


def tuner_card(name: str) -> ModelCard:
    """CARDS[name] on Lite0's features of 64-pixel images: 2 x 2 maps (4 x 4 fine ones)."""
    c = CARDS[name]
    fine = LITE0[1] if c.grid.fine_channels else 0
    grid = dataclasses.replace(c.grid, num_cells=2, fine_channels=fine)
    shape = [LITE0[0] + 4 * fine, 2, 2]
    image = ImageSpec("shrink", 64)
    return dataclasses.replace(c, feature_shape=shape, grid=grid, image=image)


@pytest.mark.parametrize("name", [n for n, c in CARDS.items() if c.kind == "multi"])
def test_a_fine_tuning_step_works_on_another_device(tmp_path, name):
    """FineTuner (its normalisation buffers, frozen and trainable units, both levels where the
    head has two, the head of every multi-object kind) trained one epoch on augmented images,
    their targets made by the kind (HeadTargets), with loop.fit on OTHER."""
    paths, objects = _photos(tmp_path, n=2)  # one batch: a step on OTHER is the point
    c = tuner_card(name)
    data = ObjectImages(paths, objects, c.image, augmentation(0.5, 0.2, 0.1, 0.3))
    collate = HeadTargets(c, head_kind(c).targets)
    loader = torch.utils.data.DataLoader(data, batch_size=2, num_workers=0, collate_fn=collate)
    torch.manual_seed(0)
    backbone = load_backbone("efficientnet_lite0", fine_layer="blocks.4" if "two" in name else None)
    model = FineTuner(backbone, build_head(c), unfreeze=1)
    before = {k: v.clone() for k, v in model.units.state_dict().items()}
    config = TrainConfig(1, 2, 1e-3, 1e-4, "constant", 0, "loss", str(OTHER))
    with other_device():
        model.to(OTHER)
        objective = model.head.objective(WEIGHTS[1])
        result = fit(
            model, ImageBatches(loader), ImageBatches(loader), objective, config, None, False
        )
    assert math.isfinite(result.history[0]["train"]["loss"])
    state = model.units.state_dict()
    last = f"{len(model.units) - 1}."
    changed = {k for k, v in before.items() if not torch.equal(state[k], v)}
    assert changed and all(k.startswith(last) for k in changed)  # the last unit alone


def test_extraction_runs_its_device_path_and_writes_what_the_cpu_writes(tmp_path):
    """extract_features with backbone.device OTHER: the model, normalisation and batches there,
    the features copied back and written as on the CPU."""
    lite0 = load_backbone("efficientnet_lite0")
    paths, _ = _photos(tmp_path, n=5)
    images = {f"img{k}": path for k, path in enumerate(paths)}
    spec = ImageSpec("shrink", 64)
    settings = ExtractSettings("float16", 2, "cpu", "float32", workers=0)
    on_cpu = extract_features(lite0, images, tmp_path / "cpu.safetensors", spec, settings, None)
    with other_device():
        elsewhere = dataclasses.replace(settings, device=OTHER.type)
        extract_features(lite0, images, tmp_path / "other.safetensors", spec, elsewhere, None)
    cpu, other = (read_features(tmp_path / f"{n}.safetensors") for n in ("cpu", "other"))
    assert on_cpu.shape == (5, 320, 2, 2) and other.image_ids == cpu.image_ids
    assert torch.allclose(other.features.float(), cpu.features.float(), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("kind", ["single", "multi"])
def test_the_inference_path_runs_on_another_device(trained, tmp_path, kind):
    """predict's path (load_detector, read_photo, detect) with the backbone and head on OTHER
    finds what it finds on the CPU (the model re-saved in float32: autocast has no OTHER)."""
    checkpoint = load_checkpoint(trained / "models" / f"{kind}.safetensors")
    card = dataclasses.replace(
        checkpoint.card, backbone=checkpoint.card.backbone | {"precision": "float32"}
    )
    model = tmp_path / "model.safetensors"
    save_checkpoint(model, checkpoint.head, card)
    paths = sorted((trained / "data" / "synthetic").rglob("*.jpg"))[:2]
    keep = Filtering(0.0, 0.5, 10)
    expected = detect(load_detector(model, "cpu"), [read_photo(p, card.image) for p in paths], keep)
    with other_device():
        detector = load_detector(model, OTHER.type)
        assert detector.device == OTHER
        assert all(p.device == OTHER for p in detector.checkpoint.head.parameters())
        found = detect(detector, [read_photo(p, card.image) for p in paths], keep)
    for got, want in zip(found, expected, strict=True):
        assert len(want) > 0
        assert torch.allclose(values(got.boxes), want.boxes, atol=1e-2)
        assert torch.equal(values(got.labels), want.labels)
