"""Fine-tuning (the opt-in finetune stage): boxes follow the pixels under the augmentation, the
backbone is cut into units and only the last ones train, the model normalises images exactly as
extraction does, and the stage trains, saves a model predict can use, or does nothing when off."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import REPO, invoke
from torchvision.transforms import v2

from pipeline_lib.base.params import parse_params
from pipeline_lib.features.backbones import backbone_units, load_backbone
from pipeline_lib.features.devices import prepare_model
from pipeline_lib.models.checkpoints import load_checkpoint
from pipeline_lib.models.heads import MlpGridHead
from pipeline_lib.models.losses import Objective
from pipeline_lib.training.finetuning import Augmentation, FineTuner, augment, augmentation
from pipeline_lib.training.loop import Dataset, fit
from pipeline_lib.training.tasks import train_config


def _boxes_image(boxes, height=60, width=80):
    """A black uint8 image with each box (integer pixel coordinates) filled white."""
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    for x0, y0, x1, y1 in boxes:
        image[:, y0:y1, x0:x1] = 255
    return image


def test_flip_moves_boxes_with_pixels_by_hand():
    image = _boxes_image([(1, 2, 5, 6)], height=10, width=20)  # white columns 1..4 (0-based)
    flipped, boxes, labels = augment(
        augmentation(hflip=1.0), image, torch.tensor([[1.0, 2, 5, 6]]), torch.tensor([3])
    )
    assert boxes.tolist() == [[15.0, 2.0, 19.0, 6.0]]  # continuous: x -> 20 - x
    assert labels.tolist() == [3]
    assert torch.equal(flipped, image.flip(-1))
    # the same white columns as VOC writes them, 1-based and inclusive: xmin 2, xmax 5; flipped
    # they are 0-based columns 15..18, i.e. VOC's 16..19 (x -> 20 + 1 - x)
    voc = torch.tensor([[2.0, 3, 5, 6]])
    _, boxes, _ = augment(augmentation(hflip=1.0), image, voc, torch.tensor([3]), pixel=1.0)
    assert boxes.tolist() == [[16.0, 3.0, 19.0, 6.0]]
    white = flipped[0, 2].nonzero().flatten() + 1  # 1-based columns of a white row
    assert (white.min().item(), white.max().item()) == (16, 19)
    # not flipped (p = 0): the boxes stay as they are, whatever the pixel
    _, boxes, _ = augment(augmentation(hflip=0.0), image, voc, torch.tensor([3]), pixel=1.0)
    assert boxes.tolist() == voc.tolist()


def test_zoom_by_hand_clamps_and_drops_boxes():
    # scale x2 about the centre (10, 10) of a 20 x 20 image: x -> 2x - 10
    zoom = Augmentation(
        v2.RandomHorizontalFlip(0.0),
        v2.Compose(
            [
                v2.RandomAffine(degrees=0, scale=(2.0, 2.0)),
                v2.ClampBoundingBoxes(),
                v2.SanitizeBoundingBoxes(min_size=1.0),
            ]
        ),
    )
    image = _boxes_image([(8, 8, 12, 12)], 20, 20)
    boxes = torch.tensor([[8.0, 8, 12, 12], [0, 0, 4, 4], [2, 9, 6, 11]])
    _, out, labels = augment(zoom, image, boxes, torch.tensor([0, 1, 2]))
    # [8, 12] -> [6, 14]; [0, 4] -> [-10, -2]: gone; x [2, 6] -> [-6, 2] clamped to [0, 2]
    assert out.tolist() == [[6.0, 6.0, 14.0, 14.0], [0.0, 8.0, 2.0, 12.0]]
    assert labels.tolist() == [0, 2]


@pytest.mark.parametrize("seed", range(12))
def test_augmented_boxes_still_frame_their_pixels(seed):
    """Draw white boxes, augment (flip, scale, shift), then each box left must frame its white
    pixels, and boxes that left the image must have no pixel left."""
    torch.manual_seed(seed)
    drawn = [(10, 8, 30, 20), (50, 30, 76, 56)]  # far enough apart to tell them apart
    image = _boxes_image(drawn)
    transform = augmentation(hflip=0.5, scale_jitter=0.3, translate=0.25, color_jitter=0.0)
    out, boxes, labels = augment(
        transform, image, torch.tensor(drawn, dtype=torch.float64), torch.tensor([0, 1])
    )
    white = out[0] > 127
    for box in boxes.tolist():
        x0, y0, x1, y1 = box
        inside = white[int(y0) + 1 : int(y1) - 1, int(x0) + 1 : int(x1) - 1]
        assert inside.float().mean() > 0.9, (seed, box)
    outside = white.clone()
    for x0, y0, x1, y1 in boxes.tolist():
        outside[max(int(y0) - 1, 0) : int(y1) + 2, max(int(x0) - 1, 0) : int(x1) + 2] = False
    assert not outside.any(), f"seed {seed}: white pixels outside every box"
    assert len(boxes) == len(labels)


@pytest.fixture(scope="module")
def lite0():
    return load_backbone("efficientnet_lite0", "head")  # with the classifier's conv: all units


def test_lite0_units_and_what_trains(lite0):
    names = [name for name, _ in backbone_units(lite0.module)]
    assert names == ["conv_stem", "bn1", *(f"blocks.{i}" for i in range(7)), "conv_head", "bn2"]
    head = MlpGridHead((1280, 7, 7), 3, num_cells=7, hidden=8)
    model = FineTuner(lite0, head, unfreeze=3)
    assert model.trainable_units == ["blocks.6", "conv_head", "bn2"]
    trains = {name for name, p in lite0.module.named_parameters() if p.requires_grad}
    assert trains and all(n.startswith(("blocks.6.", "conv_head.", "bn2.")) for n in trains)
    assert all(p.requires_grad for p in head.parameters())
    model.train()
    norms = [m for m in lite0.module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)  # ImageNet statistics kept
    assert head.training
    assert FineTuner(lite0, head, unfreeze="all").trainable_units == names
    assert FineTuner(lite0, head, unfreeze=0).trainable_units == []
    lite0.module.requires_grad_(False)


def test_finetuner_sees_the_features_extraction_makes(lite0):
    """Same normalisation and backbone as the extract stage: head outputs agree."""
    torch.manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    head = MlpGridHead((1280, 7, 7), 3, num_cells=7, hidden=8).eval()
    model = FineTuner(lite0, head, unfreeze=2).eval()
    with torch.no_grad():
        mine = model(images)
        features = prepare_model(lite0, torch.device("cpu"))(images)
        reference = head(features)
    for a, b in zip(mine, reference, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    lite0.module.to(memory_format=torch.contiguous_format)


def _project(trained, tmp_path, **finetune):
    folder = tmp_path / "project"
    shutil.copytree(trained, folder, ignore=shutil.ignore_patterns("reports"))
    params = yaml.safe_load((folder / "params.yaml").read_text())
    params["finetune"].update(finetune)
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    return folder


def test_finetune_params_reach_the_training_loop(raw_params):
    """Each finetune.* key of the loop lands in its TrainConfig field (none is the default's
    constant), and the loop honours the schedule and the epoch kept."""
    changes = {"epochs": 3, "batch_size": 8, "lr": 0.05, "weight_decay": 0.25, "seed": 7}
    changes |= {"lr_schedule": "cosine", "monitor": "last"}
    raw_params["finetune"].update(changes)
    config = train_config(parse_params(raw_params).finetune, "cpu")
    assert (config.epochs, config.batch_size, config.lr, config.weight_decay) == (3, 8, 0.05, 0.25)
    assert (config.seed, config.lr_schedule, config.monitor) == (7, "cosine", "last")
    assert config.device == "cpu"
    # A loss that rises every epoch: monitor loss keeps epoch 1, last keeps epoch 3; cosine
    # anneals the learning rate, constant keeps it.
    head = torch.nn.Linear(1, 1)
    data = Dataset(torch.zeros(4, 1), (torch.zeros(4),))
    calls = []

    def rising(outputs, targets):
        calls.append(1)
        return {"loss": outputs[0].sum() * 0 + len(calls)}

    objective = Objective(lambda o, t: rising((o,), t), lambda o, t: {})
    for monitor, schedule, kept in [("last", "cosine", 3), ("loss", "constant", 1)]:
        raw_params["finetune"].update(monitor=monitor, lr_schedule=schedule)
        config = train_config(parse_params(raw_params).finetune, "cpu")
        result = fit(head, data, data, objective, config, progress=False)
        assert result.best_epoch == kept
        lrs = [epoch["lr"] for epoch in result.history]
        assert (lrs[-1] < lrs[0]) == (schedule == "cosine"), lrs


def test_disabled_stage_writes_notes_without_torch(trained, tmp_path):
    folder = _project(trained, tmp_path, enabled=False)
    code = (
        "import sys\nfrom typer.testing import CliRunner\nfrom stages.finetune import app\n"
        "for command in ('train', 'evaluate'):\n"
        "    result = CliRunner().invoke(app, [command])\n"
        "    assert result.exit_code == 0, result.output\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        cwd=folder,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO), "PATH": ""},
    )
    assert run.returncode == 0, run.stderr
    for stage in ("finetune", "evaluate_finetune"):
        metrics = json.loads((folder / "reports" / stage / "metrics.json").read_text())
        assert metrics == {"enabled": False}
        assert (folder / "reports" / stage / "figures/README.txt").is_file()
    assert "finetune.enabled is false" in (folder / "models/finetuned/README.txt").read_text()


def test_finetune_stage_trains_and_predict_uses_it(trained, tmp_path, monkeypatch):
    from stages import finetune, predict

    folder = _project(
        trained, tmp_path, enabled=True, epochs=1, batch_size=4, unfreeze=1, workers=0, lr=0.01
    )
    monkeypatch.chdir(folder)
    output = invoke(finetune.app, ["train", "--no-progress"]).output
    assert "training blocks.6 and the head" in output  # the last unit of Lite0's last block
    metrics = json.loads((folder / "reports/finetune/metrics.json").read_text())
    assert metrics["enabled"] and metrics["trainable_units"] == ["blocks.6"]
    assert metrics["best"]["epoch"] == 1 and metrics["images"] == {"train": 12, "val": 5}
    assert (folder / "reports/finetune/figures/training_curves.png").stat().st_size > 0
    invoke(finetune.app, ["evaluate"])
    compared = json.loads((folder / "reports/evaluate_finetune/metrics.json").read_text())
    assert compared["gain"] == pytest.approx(compared["map"] - compared["map_frozen"], abs=2e-4)
    for name in ("frozen", "finetuned"):
        assert (folder / f"reports/evaluate_finetune/figures/per_class_ap_{name}.png").is_file()

    tuned = load_checkpoint(folder / "models/finetuned/model.safetensors")
    original = load_checkpoint(folder / "models/multi.safetensors")
    assert tuned.card.feature_dtype == "float32" and tuned.card.finetuned["epochs"] == 1
    assert tuned.card.finetuned["monitor"] == "loss"
    # fine-tuning trains and evaluates the backbone in float32 (from bfloat16: test_finetune_jobs)
    assert tuned.card.backbone["precision"] == "float32"
    pretrained = load_backbone("efficientnet_lite0").module.state_dict()
    state = tuned.backbone_state
    assert state.keys() == pretrained.keys()
    assert torch.equal(state["conv_stem.weight"], pretrained["conv_stem.weight"])  # frozen
    last = [k for k in state if k.startswith("blocks.6.") and k.endswith("weight")]
    assert last and any(not torch.equal(state[k], pretrained[k]) for k in last)  # trained
    before = original.head.state_dict()
    assert any(not torch.equal(t, before[k]) for k, t in tuned.head.state_dict().items())

    image = next((folder / "data/synthetic").rglob("*.jpg"))
    invoke(
        predict.app,
        [
            str(image),
            "--model",
            "models/finetuned/model.safetensors",
            "--out",
            "out",
            "--format",
            "json",
            "--score",
            "0.0",
        ],
    )
    assert (folder / "out" / f"{image.stem}.png").is_file()


def test_frozen_units_and_batchnorm_statistics_do_not_change_in_training(lite0):
    """A training step of the FineTuner: gradients reach the head and the unfrozen units only,
    and no BatchNorm layer (frozen or trainable) updates its ImageNet running statistics."""
    torch.manual_seed(0)
    head = MlpGridHead((1280, 7, 7), 3, num_cells=7, hidden=8)
    model = FineTuner(lite0, head, unfreeze=3).train()
    norms = {
        name: (m.running_mean.clone(), m.running_var.clone(), int(m.num_batches_tracked))
        for name, m in lite0.module.named_modules()
        if isinstance(m, torch.nn.BatchNorm2d)
    }
    images = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    boxes, logits = model(images)
    (boxes.square().mean() + logits.square().mean()).backward()
    grads = {name: p.grad for name, p in lite0.module.named_parameters()}
    trainable = ("blocks.6.", "conv_head.", "bn2.")
    assert all(g is None for n, g in grads.items() if not n.startswith(trainable))
    assert all(
        g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith(trainable)
    )
    assert all(p.grad is not None for p in head.parameters())
    for name, m in lite0.module.named_modules():
        if name in norms:
            mean, var, count = norms[name]
            assert torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var), name
            assert int(m.num_batches_tracked) == count, name
    lite0.module.zero_grad(set_to_none=True)
    lite0.module.requires_grad_(False)


def test_each_augmentation_setting_reaches_its_transform():
    made = augmentation(0.3, 0.2, 0.1, 0.4)
    flip, (affine, colour, clamp, sanitize) = made.flip, made.jitter.transforms
    assert flip.p == 0.3 and affine.degrees == [0.0, 0.0]  # never rotated
    assert affine.translate == (0.1, 0.1) and affine.scale == pytest.approx((0.8, 1.2))
    for jitter in (colour.brightness, colour.contrast, colour.saturation):
        assert jitter == pytest.approx((0.6, 1.4))
    assert colour.hue is None and isinstance(clamp, v2.ClampBoundingBoxes)
    assert sanitize.min_size == 1.0  # a box under a pixel wide or high after the affine goes
    defaults = augmentation()  # flips only
    flip, (affine, colour, *_) = defaults.flip, defaults.jitter.transforms
    assert flip.p == 0.5 and affine.translate == (0.0, 0.0) and affine.scale == (1.0, 1.0)
    assert colour.brightness is colour.contrast is colour.saturation is None
