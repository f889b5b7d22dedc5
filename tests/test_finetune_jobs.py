"""What the finetune stages build (finetuning.py), fast: a tiny VOC folder whose every image holds
one cat in each cell of a 2 x 2 grid, and models made by hand (tests/handmade.py) whose every cell
predicts exactly that box, as a cat or as a dog. So the mAPs are known without running anything
else: 1 for the cat model (every object found, no false positive), 0 for the dog one."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import handmade
import pytest
import torch
from conftest import REPO, VocFolder, voc_xml
from handmade import lite0, write_model
from torch.utils.data import RandomSampler, SequentialSampler

from pipeline_lib import finetuning
from pipeline_lib.backbones import load_backbone
from pipeline_lib.checkpoints import load_checkpoint
from pipeline_lib.distributed import Ranks
from pipeline_lib.errors import PipelineError
from pipeline_lib.geometry import ImageSpec
from pipeline_lib.losses import grid_loss
from pipeline_lib.modelcard import GridSpec
from pipeline_lib.params import load_params
from pipeline_lib.tables import write_prepared
from pipeline_lib.tasks import loss_weights
from pipeline_lib.training import TrainConfig, fit
from pipeline_lib.voc import VOC_CLASSES, read_voc

CAT, DOG = VOC_CLASSES.index("cat"), VOC_CLASSES.index("dog")
SIDE = 128
SPLITS = {"train": ["t1", "t2", "t3"], "val": ["v1", "v2"]}


def cell_objects() -> list[str]:
    """One cat per cell of a 2 x 2 grid of a 128-pixel image: centred in the cell, 32 x 64
    (CELL_BOX), in VOC's 1-based pixels."""
    objects = []
    for i in range(2):
        for j in range(2):
            x0, y0 = j * 64 + 16, i * 64
            box = f"<xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin>"
            box += f"<xmax>{x0 + 32}</xmax><ymax>{y0 + 64}</ymax>"
            objects.append(f"<object><name>cat</name><bndbox>{box}</bndbox></object>")
    return objects


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """data/prepared of the cat images, and the cat (`cat.safetensors`) and dog models."""
    root = tmp_path_factory.mktemp("finetune")
    voc = VocFolder(root / "VOCdevkit" / "VOC2007")
    for split, ids in SPLITS.items():
        for image_id in ids:
            voc.add(image_id, voc_xml(f"{image_id}.jpg", SIDE, SIDE, cell_objects()), (SIDE, SIDE))
        voc.split(split, ids)
    splits = {s: s for s in SPLITS}
    rows = read_voc(voc.root, splits, VOC_CLASSES, progress=False)
    info = {
        "source": "voc",
        "dataset_dir": voc.root.as_posix(),
        "classes": list(VOC_CLASSES),
        "splits": splits,
    }
    write_prepared(root / "prepared", rows.images, rows.objects, info)
    card = handmade.grid_card(VOC_CLASSES)
    write_model(root / "cat.safetensors", card, label=CAT)
    write_model(root / "dog.safetensors", card, label=DOG)
    return root


def finetune_params(**changes):
    params = load_params(REPO / "params.yaml")
    ft = replace(params.finetune, workers=0, batch_size=2, **changes)
    return replace(params, finetune=ft)


def test_read_frozen_refuses_what_cannot_be_fine_tuned(folder, tmp_path):
    checkpoint, prepared = finetuning.read_frozen(folder / "cat.safetensors", folder / "prepared")
    assert checkpoint.classes == list(VOC_CLASSES) and len(prepared.images) == 5
    card = handmade.grid_card(VOC_CLASSES)
    cases = {
        "single": (
            replace(card, kind="single", head={"hidden": 8}, grid=None),
            "a single-object head, not a grid head",
        ),
        "fcos": (
            replace(card, head={"kind": "fcos", "width": 32, "depth": 1}),
            " is an FCOS head (head.grid_kind: fcos): fine-tuning it is not supported yet; set "
            "head.grid_kind: conv",
        ),
        "levels": (
            replace(card, feature_shape=[768, 2, 2], grid=GridSpec(2, None, 112, 0.3)),
            " is a two-level grid head (backbone.fine_layer): fine-tuning it is not supported "
            "yet; set backbone.fine_layer: none",
        ),
        "none": (replace(card, image=ImageSpec("none", 64)), "image.mode: none keeps every"),
        "random": (
            replace(card, backbone=card.backbone | {"weights": "random"}),
            ": trained on a randomly initialised efficientnet_lite0, which cannot be rebuilt to "
            "fine-tune; use backbone.weights: imagenet",
        ),
        "classes": (replace(card, classes=["cat", "dog"]), "data/prepared has classes"),
    }
    for name, (bad, message) in cases.items():
        path = write_model(tmp_path / f"{name}.safetensors", bad)
        with pytest.raises(PipelineError) as raised:
            finetuning.read_frozen(path, folder / "prepared")
        assert message in str(raised.value), str(raised.value)
        if name not in ("none", "classes"):
            assert str(raised.value).startswith(str(path)) and str(raised.value).endswith(message)


def test_the_loaders_augment_and_shuffle_train_only(folder):
    checkpoint, prepared = finetuning.read_frozen(folder / "cat.safetensors", folder / "prepared")
    ft = finetune_params(seed=5).finetune
    cpu = torch.device("cpu")
    train = finetuning.image_loader(ft, checkpoint, prepared, "train", cpu)
    val = finetuning.image_loader(ft, checkpoint, prepared, "val", cpu)
    assert (len(train.dataset), len(val.dataset)) == (3, 2)
    assert isinstance(train.sampler, RandomSampler) and isinstance(val.sampler, SequentialSampler)
    assert train.batch_size == val.batch_size == 2 and train.num_workers == 0
    assert not train.pin_memory and train.generator.initial_seed() == 5
    assert train.dataset.transform is not None and val.dataset.transform is None
    assert [p.name for p in val.dataset.paths] == ["v1.jpg", "v2.jpg"]
    assert val.dataset.layout.spec == ImageSpec("shrink", 64)
    image, boxes, has_obj, labels = val.dataset[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.uint8
    assert has_obj.tolist() == [[True, True], [True, True]]  # one cat in each cell
    assert labels.tolist() == [[CAT, CAT], [CAT, CAT]]
    # centred in its cell, 0.25 x 0.5 of the image (VOC's 1-based pixels: 31/128 x 63/128)
    assert boxes[:, 0, 0].tolist() == pytest.approx([0.5, 0.5, 31 / 128, 63 / 128], abs=0.02)


def test_rebuild_uses_the_models_own_backbone_and_finetuned_from_tells_models_apart(tmp_path):
    card = handmade.grid_card(VOC_CLASSES)
    tuned = load_backbone("efficientnet_lite0")
    with torch.no_grad():
        tuned.module[0].weight.mul_(-1)
    path = write_model(tmp_path / "tuned.safetensors", card, tuned.module)
    frozen = load_checkpoint(write_model(tmp_path / "frozen.safetensors", card))
    checkpoint = load_checkpoint(path)
    backbone, model = finetuning.rebuild(checkpoint, unfreeze=2)
    assert torch.equal(backbone.module[0].weight, tuned.module[0].weight)
    assert model.trainable_units == ["blocks.5", "blocks.6"] and model.head is checkpoint.head
    assert finetuning.rebuild(frozen)[1].trainable_units == []  # unfreeze 0 by default
    assert torch.equal(finetuning.rebuild(frozen)[0].module[0].weight, lite0().module[0].weight)
    assert finetuning.finetuned_from(checkpoint, frozen)
    assert not finetuning.finetuned_from(frozen, frozen)  # no backbone weights of its own
    bf16 = replace(frozen, card=replace(card, backbone=card.backbone | {"precision": "bfloat16"}))
    assert finetuning.finetuned_from(checkpoint, bf16)  # the precision aside
    other = replace(frozen, card=replace(card, backbone=card.backbone | {"layer": "head"}))
    assert not finetuning.finetuned_from(checkpoint, other)


def test_compare_models_by_hand(folder):
    checkpoint, prepared = finetuning.read_frozen(folder / "cat.safetensors", folder / "prepared")
    dog = load_checkpoint(folder / "dog.safetensors")
    params, cpu = finetune_params(), torch.device("cpu")
    loader = finetuning.image_loader(params.finetune, checkpoint, prepared, "val", cpu)
    results = finetuning.compare_models(
        {"frozen": dog, "finetuned": checkpoint}, prepared, loader, params.eval, cpu
    )
    assert results["finetuned"].per_class_ap()["cat"] == 1.0  # 8 of 8 cats, nothing else
    assert results["frozen"].per_class_ap()["cat"] == 0.0 and results["frozen"].map() == 0.0
    metrics = finetuning.comparison_metrics(results, 2, params.eval, "voc_inclusive_pixels")
    assert metrics == {
        "enabled": True,
        "images": 2,
        "iou_threshold": params.eval.iou_threshold,
        "overlap": "voc_inclusive_pixels",
        "map_frozen": 0.0,
        "map": 1.0,
        "gain": 1.0,
    }


def test_a_finetune_job_from_params_trains_and_reports(folder):
    checkpoint, prepared = finetuning.read_frozen(folder / "cat.safetensors", folder / "prepared")
    params = finetune_params(unfreeze=2, epochs=2, lr=0.001, lr_schedule="cosine", seed=3)
    ft, cpu = params.finetune, torch.device("cpu")
    job = finetuning.finetune_job(checkpoint, prepared, params, cpu)
    assert job.config == TrainConfig(
        2, 2, 0.001, ft.weight_decay, "cosine", 3, ft.monitor, "cpu", ema_decay=0.0
    )
    assert job.model.trainable_units == ["blocks.5", "blocks.6"]
    assert job.parallel is None and job.trained is job.model
    assert (job.train.images, job.val.images) == (3, 2) and len(job.train) == 3
    assert job.train.loader.dataset.transform is not None
    assert job.val.loader.dataset.transform is None
    loss = job.objective.loss_fn
    assert loss.func is grid_loss and loss.keywords == {"weights": loss_weights(params.train)}
    trainable = sum(p.numel() for p in job.model.trainable.parameters())
    trainable += sum(p.numel() for p in checkpoint.head.parameters())
    assert job.describe() == (
        f"training blocks.5, blocks.6 and the head ({trainable:,} parameters) on 3 images, cpu"
    )
    result = fit(job.trained, job.train, job.val, job.objective, job.config, progress=False)
    assert len(result.history) == 2 and job.train.epoch == 2  # two passes over the loader
    result = replace(result, best_epoch=2, seconds=5.0)
    metrics = job.metrics(result)
    assert metrics == {
        "enabled": True,
        "images": {"train": 3, "val": 2},
        "best": {"epoch": 2}
        | {f"val_{k}": round(v, 6) for k, v in result.history[1]["val"].items()},
        "epochs": 2,
        "seconds_per_epoch": 2.5,
        "trainable_units": ["blocks.5", "blocks.6"],
        "trainable_parameters": trainable,
        "device": "cpu",
    }
    card = job.card(checkpoint.card, result)
    assert card.feature_dtype == "float32" and card.backbone["precision"] == "float32"
    assert card.finetuned == {
        "best_epoch": 2,
        "monitor": ft.monitor,
        "epochs": 2,
        "trainable_units": ["blocks.5", "blocks.6"],
    }
    assert (
        replace(card, feature_dtype="float16", backbone=checkpoint.card.backbone, finetuned=None)
        == checkpoint.card
    )


def test_a_head_only_job_says_so(folder):
    checkpoint, prepared = finetuning.read_frozen(folder / "cat.safetensors", folder / "prepared")
    job = finetuning.finetune_job(
        checkpoint, prepared, finetune_params(unfreeze=0), torch.device("cpu")
    )
    head = sum(p.numel() for p in checkpoint.head.parameters())
    assert (
        job.describe()
        == f"training no backbone unit and the head ({head:,} parameters) on 3 images, cpu"
    )


def test_the_training_device_on_cpu_shares_the_cores_between_processes(monkeypatch):
    threads = []
    monkeypatch.setattr(finetuning.torch, "set_num_threads", threads.append)
    assert finetuning.training_device("cpu") == torch.device("cpu") and threads == []
    assert finetuning.training_device("auto") == torch.device("cpu")  # no GPU here
    two = Ranks(rank=1, world=2, local_rank=1, local_world=2)
    assert finetuning.training_device("cpu", two) == torch.device("cpu")
    assert threads == [two.threads()]


def test_under_torchrun_each_process_takes_its_own_gpu(monkeypatch):
    chosen = []
    monkeypatch.setattr(finetuning, "pick_device", lambda device: torch.device("cuda"))
    monkeypatch.setattr(finetuning.torch.cuda, "set_device", chosen.append)
    two = Ranks(rank=1, world=2, local_rank=1, local_world=2)
    assert finetuning.training_device("auto", two) == torch.device("cuda", 1)
    assert chosen == [torch.device("cuda", 1)]
    assert finetuning.training_device("auto") == torch.device("cuda")  # one process: as chosen
    assert chosen == [torch.device("cuda", 1)]
