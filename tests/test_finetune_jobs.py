"""What the finetune stages build (finetuning.py), fast: a tiny VOC folder whose every image holds
one cat in each cell of a 2 x 2 grid, and models made by hand (tests/handmade.py) whose every cell
predicts exactly that box, as a cat or as a dog. So the mAPs are known without running anything
else: 1 for the cat model (every object found, no false positive), 0 for the dog one."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import handmade
import pytest
import torch
from conftest import REPO, VocFolder, voc_xml
from handmade import lite0, write_model
from torch.utils.data import DistributedSampler, RandomSampler, SequentialSampler

from pipeline_lib.base.distributed import Ranks
from pipeline_lib.base.errors import PipelineError
from pipeline_lib.base.params import load_params
from pipeline_lib.boxes.detection import Filtering
from pipeline_lib.boxes.geometry import ImageSpec
from pipeline_lib.data.tables import write_prepared
from pipeline_lib.data.voc import VOC_CLASSES, read_voc
from pipeline_lib.features.backbones import load_backbone
from pipeline_lib.models import heads
from pipeline_lib.models.checkpoints import load_checkpoint, save_checkpoint
from pipeline_lib.models.headkinds import build_head
from pipeline_lib.models.losses import grid_loss
from pipeline_lib.models.modelcard import GridSpec
from pipeline_lib.models.targets import image_objects
from pipeline_lib.training import finetuning
from pipeline_lib.training.loop import TrainConfig, fit
from pipeline_lib.training.tasks import loss_weights, train_config

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
            "a single-object head; fine-tuning takes multi-object ones",
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
        if name == "classes":
            assert str(raised.value).endswith(
                f"but {path} was trained on ['cat', 'dog']: run dvc repro"
            )
        if name not in ("none", "classes"):
            assert str(raised.value).startswith(str(path)) and str(raised.value).endswith(message)


def test_read_frozen_takes_every_multi_object_kind_on_one_level_or_two(folder, tmp_path):
    card = handmade.grid_card(VOC_CLASSES)
    fcos = {"kind": "fcos", "width": 32, "depth": 1}
    levels = {"feature_shape": [320 + 4 * 112, 2, 2], "grid": GridSpec(2, None, 112, 0.3)}
    models = {
        "fcos": replace(card, head=fcos),
        "fcos two levels": replace(card, head=fcos, **levels),
        "lab two levels": replace(card, head={"kind": "lab", "hidden": 8}, **levels),
    }
    for name, good in models.items():
        path = tmp_path / f"{name}.safetensors"
        save_checkpoint(path, build_head(good), good)
        assert finetuning.read_frozen(path, folder / "prepared")[0].card == good


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
    assert val.dataset.spec == ImageSpec("shrink", 64)
    images, boxes, has_obj, labels = next(iter(val))  # the grid targets, as training makes them
    assert images.shape == (2, 3, 64, 64) and images.dtype == torch.uint8
    boxes, has_obj, labels = boxes[0], has_obj[0], labels[0]
    assert has_obj.tolist() == [[True, True], [True, True]]  # one cat in each cell
    assert labels.tolist() == [[CAT, CAT], [CAT, CAT]]
    # centred in its cell, 0.25 x 0.5 of the image (VOC's 1-based pixels: 31/128 x 63/128)
    assert boxes[:, 0, 0].tolist() == pytest.approx([0.5, 0.5, 31 / 128, 63 / 128], abs=0.02)


def test_the_loaders_follow_the_augmentation_params_the_device_and_the_ranks(folder):
    checkpoint, prepared = finetuning.read_frozen(folder / "cat.safetensors", folder / "prepared")
    changes = {"hflip": 0.25, "scale_jitter": 0.1, "translate": 0.2, "color_jitter": 0.3}
    ft = finetune_params(**changes, seed=7).finetune  # not the default seed (0)
    data = finetuning.image_loader(ft, checkpoint, prepared, "train", torch.device("cpu")).dataset
    flip, (affine, colour, *_) = data.transform.flip, data.transform.jitter.transforms
    assert flip.p == 0.25 and affine.translate == (0.2, 0.2)
    # VOC's inclusive pixels: one pixel of each 128-wide photo, shrunk to the card's side, is
    # side / 128 pixels wide there (the flip's shift)
    side = checkpoint.card.image.size
    assert data.pixels == pytest.approx([side / SIDE] * len(data))
    assert affine.scale == pytest.approx((0.9, 1.1))
    assert colour.brightness == colour.contrast == colour.saturation == pytest.approx((0.7, 1.3))
    # beside a GPU: pinned memory and, with finetune.workers auto, a decoding process per core
    cuda = replace(ft, workers="auto")
    loader = finetuning.image_loader(cuda, checkpoint, prepared, "val", torch.device("cuda", 0))
    assert loader.pin_memory and loader.num_workers == min(16, os.cpu_count())
    auto = finetuning.image_loader(cuda, checkpoint, prepared, "val", torch.device("cpu"))
    assert not auto.pin_memory and auto.num_workers == 1
    # under torchrun, each rank its part: shuffled (from finetune.seed) for train only
    two = Ranks(rank=1, world=2, local_rank=1, local_world=2)
    train, val = (
        finetuning.image_loader(ft, checkpoint, prepared, split, torch.device("cpu"), two)
        for split in ("train", "val")
    )
    for loader, shuffle in ((train, True), (val, False)):
        sampler = loader.sampler
        assert isinstance(sampler, DistributedSampler) and sampler.shuffle == shuffle
        assert (sampler.num_replicas, sampler.rank, sampler.seed) == (2, 1, ft.seed)
    assert len(train.sampler) == 2 and list(val.sampler) == [1]  # 3 images padded to 4
    batches = finetuning.ImageBatches(train, epoch=3)
    assert len(list(batches.batches(2))) == 1  # this rank's two images
    assert train.sampler.epoch == 3 and batches.epoch == 4


def test_the_loaders_make_the_targets_of_an_anchored_model(folder, tmp_path):
    anchors = [[0.25, 0.5], [0.5, 0.25]]
    grid = GridSpec(2, anchors, assign="neighbours", anchor_ratio=4.0)
    card = handmade.grid_card(VOC_CLASSES, grid=grid)
    path = tmp_path / "anchored.safetensors"
    save_checkpoint(path, build_head(card), card)
    checkpoint, prepared = finetuning.read_frozen(path, folder / "prepared")
    loader = finetuning.image_loader(
        finetune_params().finetune, checkpoint, prepared, "val", torch.device("cpu")
    )
    _, boxes, has_obj, _ = loader.collate_fn([loader.dataset[0]])
    # the card's anchors and assignment: an object to every anchor within the ratio
    assert boxes.shape == (1, 2, 4, 2, 2) and has_obj.shape == (1, 2, 2, 2)  # (A, 4, S, S)
    assert has_obj.sum() == 8  # each cat (0.25 x 0.5) within ratio 4 of both anchors


def test_an_image_without_objects_has_empty_targets(folder):
    _, prepared = finetuning.read_frozen(folder / "cat.safetensors", folder / "prepared")
    objects = prepared.objects[prepared.objects["image_id"] != "v2"]
    found = image_objects(replace(prepared, objects=objects), ["v1", "v2"], ImageSpec("shrink", 64))
    assert found[0][0].shape == (4, 4) and found[0][1].tolist() == [CAT] * 4
    boxes, labels = found[1]
    assert boxes.shape == (0, 4) and boxes.dtype == torch.float64
    assert labels.shape == (0,) and labels.dtype == torch.int64


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
    assert finetuning.rebuild(other)[0].layer == "head"
    random = replace(frozen, card=replace(card, backbone=card.backbone | {"weights": "random"}))
    backbone = finetuning.rebuild(random)[0]
    assert backbone.weights == "random"
    assert not torch.equal(backbone.module[0].weight, lite0().module[0].weight)


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


def test_compare_models_filters_as_eval_says_on_the_device_given(folder, monkeypatch):
    checkpoint, prepared = finetuning.read_frozen(folder / "cat.safetensors", folder / "prepared")
    params, cpu = finetune_params(), torch.device("cpu")
    loader = finetuning.image_loader(params.finetune, checkpoint, prepared, "val", cpu)
    ev = replace(params.eval, max_detections=2, nms_iou=0.3, score_threshold=0.1)
    filters, real = [], heads.grid_detections  # the grid heads' decoding (heads.GridContract)
    monkeypatch.setattr(heads, "grid_detections", lambda *a: filters.append(a[-1]) or real(*a))
    results = finetuning.compare_models({"finetuned": checkpoint}, prepared, loader, ev, cpu)
    assert filters == [Filtering(0.1, 0.3, 2)]
    # two of each image's four cats kept, all right: precision 1 up to recall 1/2
    assert results["finetuned"].per_class_ap()["cat"] == 0.5

    class Ran(Exception):
        pass

    def outputs(model, loader, device):
        raise Ran(next(model.parameters()).device, device)

    monkeypatch.setattr(finetuning, "head_outputs", outputs)
    meta = torch.device("meta")
    with pytest.raises(Ran) as ran:
        finetuning.compare_models({"finetuned": checkpoint}, prepared, loader, ev, meta)
    assert ran.value.args == (meta, meta)  # the model moved there and told to feed it there


def test_comparison_metrics_round_to_four_digits():
    class Summary:
        def __init__(self, value):
            self.value = value

        def map(self):
            return self.value

    results = {"frozen": Summary(0.123456), "finetuned": Summary(0.654321)}
    ev = load_params(REPO / "params.yaml").eval
    metrics = finetuning.comparison_metrics(results, 7, ev, "pixels")
    assert (metrics["map_frozen"], metrics["map"], metrics["gain"]) == (0.1235, 0.6543, 0.5309)
    assert (metrics["images"], metrics["overlap"]) == (7, "pixels")


def test_the_config_names_the_device_it_was_given():
    ft = finetune_params().finetune
    assert train_config(ft, str(torch.device("cuda", 1))).device == "cuda:1"
    assert train_config(ft, "meta").device == "meta"
    # fine-tuning has no moving average or warm-up: the loop's own defaults (off)
    assert (train_config(ft, "cpu").ema_decay, train_config(ft, "cpu").warmup_epochs) == (0, 0)


def test_under_torchrun_the_job_trains_in_distributed_data_parallel(folder, monkeypatch):
    """DistributedDataParallel and the GPU stood in for: what each is given is recorded."""
    checkpoint, prepared = finetuning.read_frozen(folder / "cat.safetensors", folder / "prepared")

    class Parallel(torch.nn.Module):
        def __init__(self, module, device_ids):
            super().__init__()
            self.module, self.device_ids = module, device_ids

    moved = []
    monkeypatch.setattr(finetuning, "DistributedDataParallel", Parallel)
    monkeypatch.setattr(finetuning.FineTuner, "to", lambda self, device: moved.append(device))
    monkeypatch.setattr(finetuning.torch.distributed, "get_world_size", lambda: 2)
    two = Ranks(rank=1, world=2, local_rank=1, local_world=2)
    params = finetune_params(unfreeze=1)
    for device, ids in ((torch.device("cuda", 1), [1]), (torch.device("cpu"), None)):
        job = finetuning.finetune_job(checkpoint, prepared, params, device, two)
        assert moved[-1] == device
        assert isinstance(job.parallel, Parallel) and job.trained is job.parallel
        assert job.parallel.module is job.model and job.parallel.device_ids == ids
        assert job.train.loader.sampler.rank == 1 and job.val.loader.sampler.num_replicas == 2
        assert job.describe().endswith(f"on 3 images, {device} in 2 processes")
        ours = {id(p) for p in job.backbone.module.parameters()}  # the model's own backbone
        trained = {id(p) for p in job.model.units.parameters() if p.requires_grad}
        assert trained and trained < ours


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
    trainable = sum(p.numel() for p in job.model.units.parameters() if p.requires_grad)
    trainable += sum(p.numel() for p in checkpoint.head.parameters())
    assert job.describe() == (
        f"training blocks.5, blocks.6 and the head ({trainable:,} parameters) on 3 images, cpu"
    )
    result = fit(job.trained, job.train, job.val, job.objective, job.config, progress=False)
    assert len(result.history) == 2 and job.train.epoch == 2  # two passes over the loader
    result = replace(result, best_epoch=2, seconds=5.18)
    metrics = job.metrics(result)
    assert metrics == {
        "enabled": True,
        "images": {"train": 3, "val": 2},
        "best": {"epoch": 2}
        | {f"val_{k}": round(v, 6) for k, v in result.history[1]["val"].items()},
        "epochs": 2,
        "seconds_per_epoch": 2.6,  # 2.59, to a tenth
        "trainable_units": ["blocks.5", "blocks.6"],
        "trainable_parameters": trainable,
        "device": "cpu",
    }
    # a model whose features were extracted in bfloat16: fine-tuning trains and evaluates float32
    frozen = replace(checkpoint.card, backbone=checkpoint.card.backbone | {"precision": "bfloat16"})
    card = job.card(frozen, result)
    assert card.feature_dtype == "float32" and card.backbone["precision"] == "float32"
    assert card.finetuned == {
        "best_epoch": 2,
        "monitor": ft.monitor,
        "epochs": 2,
        "trainable_units": ["blocks.5", "blocks.6"],
    }
    assert (
        replace(card, feature_dtype="float16", backbone=frozen.backbone, finetuned=None) == frozen
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
    monkeypatch.setattr(finetuning, "pick_device", lambda device, key: torch.device("cuda"))
    monkeypatch.setattr(finetuning.torch.cuda, "set_device", chosen.append)
    two = Ranks(rank=1, world=2, local_rank=1, local_world=2)
    assert finetuning.training_device("auto", two) == torch.device("cuda", 1)
    assert chosen == [torch.device("cuda", 1)]
    assert finetuning.training_device("auto") == torch.device("cuda")  # one process: as chosen
    assert chosen == [torch.device("cuda", 1)]
