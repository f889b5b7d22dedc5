"""Every tunable of params.yaml changes what it should.

For each key, two values and a probe: the probe runs the code that reads the key (the library,
and where a stage passes it on, the stage) on tiny inputs, and returns what the key must move (a
model's loss, targets, a feature file, a figure's size, the files written, ...). The two values
must give different results: a key silently ignored, or replaced by a constant equal to its
default, fails here. `test_every_key_has_a_probe` keeps the table complete.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, built_once, tiny_params, with_param, write_tiny_voc
from PIL import Image

from pipeline_lib.base.errors import PipelineError
from pipeline_lib.base.params import parse_params
from pipeline_lib.evaluation.evaluate import grid_report, read_evaluation_inputs, single_report
from pipeline_lib.features import extraction as features_module
from pipeline_lib.features.devices import pick_device
from pipeline_lib.training.loop import fit, seed_everything
from pipeline_lib.training.tasks import grid_task, read_training_inputs, single_task, train_config


def leaf_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        if isinstance(value, dict):
            keys += leaf_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def digest(*values) -> str:
    """A short fingerprint of tensors, arrays, numbers and strings."""
    h = hashlib.sha256()
    for value in values:
        if isinstance(value, torch.Tensor):
            value = value.detach().float().numpy()
        if isinstance(value, np.ndarray):
            h.update(np.ascontiguousarray(value).tobytes())
        else:
            h.update(repr(value).encode())
    return h.hexdigest()[:16]


def outcome(probe, *args) -> str:
    """The probe's fingerprint, or the error it raised (a refused value is an effect too)."""
    try:
        return probe(*args)
    except (PipelineError, ValueError, RuntimeError) as error:
        return f"error: {type(error).__name__}: {str(error)[:80]}"


# --- probes -----------------------------------------------------------------------------------

_BACKBONES: dict = {}


def cached_backbone(name, layer=None, weights="imagenet", fine_layer=None):
    """load_backbone, each kind loaded once for the module (a copy each time: extraction moves
    the module in place)."""
    from pipeline_lib.features.backbones import load_backbone

    key = (name, layer, weights, fine_layer)
    if key not in _BACKBONES:
        _BACKBONES[key] = load_backbone(name, layer, weights, fine_layer)
    return copy.deepcopy(_BACKBONES[key])


def small(raw: dict) -> dict:
    """Tiny heads for the task and fit probes."""
    raw = copy.deepcopy(raw)
    raw["head"].update(conv_width=32, hidden=16, grid_hidden=16)
    return raw


def task_probe(kind: str):
    """The task a train stage builds: its card, targets and the loss of a fixed batch."""

    def probe(raw: dict, env: dict) -> str:
        params = parse_params(raw)
        make = single_task if kind == "single" else grid_task
        seed_everything(0)
        task = make(env["inputs"], params)
        data = task.data["train"]
        x, targets = next(data.batches(4, torch.arange(4)))
        task.head.train()
        losses = task.objective.loss_fn(task.head(x), targets)
        flips = data.flips
        flipped = None if flips is None else (flips.probability, flips.features is None)
        shapes = sorted((k, tuple(v.shape)) for k, v in task.head.state_dict().items())
        card = json.dumps(task.card.to_dict(), sort_keys=True)
        return digest(card, shapes, *data.targets, *losses.values(), flipped)

    return probe


def fit_probe(raw: dict, env: dict) -> str:
    """Two epochs of the grid head (what training keeps, and the learning rates it ran)."""
    params = parse_params(small(raw))
    seed_everything(params.train.seed)
    task = grid_task(env["inputs"], params)
    config = train_config(params.train, str(pick_device(params.train.device, "train.device")))
    config.epochs = min(config.epochs, 3)
    result = fit(
        task.head, task.data["train"], task.data["val"], task.objective, config, None, False
    )
    lrs = [epoch["lr"] for epoch in result.history]
    return digest(result.best_epoch, lrs, *result.best_state.values())


def lazy_probe(raw: dict, env: dict, monkeypatch) -> str:
    """train.features: what the train stage asks read_training_inputs for."""
    from stages import train as train_stage

    seen = {}

    def record(prepared, features, lazy=False):
        seen["lazy"] = lazy
        raise PipelineError("recorded")

    monkeypatch.setattr(train_stage, "read_training_inputs", record)
    folder = env["tmp"] / "lazy"
    folder.mkdir(exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(folder)
    with pytest.raises(BaseException):  # noqa: B017 (the stage's clean exit)
        train_stage.run(single_task, Path("params.yaml"), False)
    return str(seen)


def kernels_probe(raw: dict, env: dict, monkeypatch) -> str:
    """train.cpu_kernels: what pin_cpu_kernels asks of ATen and oneDNN."""
    from pipeline_lib.training.loop import pin_cpu_kernels

    for name in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA"):
        monkeypatch.setenv(name, "before")  # so that the test's end restores the original state
        monkeypatch.delenv(name)
    pin_cpu_kernels(parse_params(raw).train.cpu_kernels)
    return str([os.environ.get(n) for n in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")])


def report_probe(kind: str):
    """An evaluate stage's report: its metrics, tables, the size of each figure and the pixels
    of the figures of images (what eval.draw_score and eval.samples draw)."""

    def probe(raw: dict, env: dict, monkeypatch) -> str:
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        monkeypatch.chdir(env["trained"])  # the prepared tables name the images relative to it
        ev = parse_params(raw).eval
        inputs = env[f"evaluation_{kind}"]
        report = (single_report if kind == "single" else grid_report)(inputs, ev)
        metrics = {k: v for k, v in report.metrics.items() if k != "seconds"}
        sizes = {name: tuple(fig.get_size_inches()) for name, fig in report.figures.items()}
        pixels = []
        for name in ("nms_before_after.png", "predictions.png"):
            if name in report.figures:
                canvas = FigureCanvasAgg(report.figures[name])
                canvas.draw()
                pixels.append(np.asarray(canvas.buffer_rgba()))
        more = json.dumps(report.more_metrics, sort_keys=True)  # intervals.json, errors.json
        return digest(json.dumps(metrics, sort_keys=True), more, report.tables, sizes, *pixels)

    return probe


def extract_probe(raw: dict, env: dict, monkeypatch) -> str:
    """extract_features as the extract stage calls it: the file written, the batches the model
    saw, the decoding processes, whether torch.compile ran."""
    from pipeline_lib.boxes.geometry import ImageSpec
    from pipeline_lib.features.extraction import ExtractSettings, extract_features
    from pipeline_lib.features.featurefiles import read_features

    params = parse_params(raw)
    bb, seen = params.backbone, {"rows": [], "compiled": False, "workers": None}
    real_model = features_module.prepare_model

    def recording_model(*args, **kwargs):
        forward = real_model(*args, **kwargs)

        def call(batch):
            seen["rows"].append(len(batch))
            return forward(batch)

        return call

    class Loader(features_module.DataLoader):
        def __init__(self, *args, num_workers=0, **kwargs):
            seen["workers"] = num_workers
            super().__init__(*args, num_workers=0, **kwargs)

    def compiled(model, **kwargs):
        seen["compiled"] = True
        return model

    monkeypatch.setattr(features_module, "prepare_model", recording_model)
    monkeypatch.setattr(features_module, "DataLoader", Loader)
    monkeypatch.setattr(torch, "compile", compiled)
    backbone = cached_backbone(bb.name, bb.layer, bb.weights, bb.fine_layer)
    settings = ExtractSettings.from_params(bb, params.data.on_error)
    spec = ImageSpec(params.image.mode, params.image.size)
    out = env["tmp"] / "features.safetensors"
    result = extract_features(backbone, env["photos"], out, spec, settings, None)
    stored = read_features(out)
    return digest(stored.features, stored.metadata, result.image_ids, seen)


def extract_stage_probe(raw: dict, env: dict, monkeypatch) -> str:
    """The extract stage: the jobs it hands the library, and whether it restarts under
    torchrun."""
    from pipeline_lib.features.extraction import ExtractResult
    from stages import common
    from stages import extract as extract_stage

    calls = []

    def record(backbone, images, out_path, spec, settings, label, ranks, flipped=False):
        calls.append((out_path.name, len(images), flipped))
        return ExtractResult(list(images), (len(images), 1, 1, 1), 0.0)

    def restart(processes, module, *args):
        calls.append(("torchrun", processes))
        if processes > 1:
            raise PipelineError("restarted")

    monkeypatch.setattr(extract_stage, "extract_features", record)
    monkeypatch.setattr(extract_stage, "restart_under_torchrun", restart)
    monkeypatch.setattr(common, "restart_under_torchrun", restart)
    folder = env["tmp"] / "stage"
    if not folder.exists():
        shutil.copytree(env["trained"], folder, ignore=shutil.ignore_patterns("models", "reports"))
    (folder / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(folder)
    try:
        extract_stage.main(Path("params.yaml"))
    except BaseException as stopped:  # noqa: BLE001 (the stage's clean exit, with its code)
        calls.append(repr(stopped))
    return str(calls)


def source_probe(raw: dict, env: dict, monkeypatch) -> str:
    """prepare's reading: which images and objects of which folder and splits, what it skips."""
    from pipeline_lib.data import sources

    downloads = []
    monkeypatch.setattr(sources, "download_voc2012", lambda root: downloads.append(str(root)))
    data = parse_params(raw).data
    source = sources.read_source(data, env["synthetic"])
    rows = source.rows
    return digest(rows.images, rows.objects, [s["reason"] for s in rows.skipped], downloads)


def figures_probe(raw: dict, env: dict, monkeypatch) -> str:
    """prepare's figures: which are drawn, and their sizes."""
    from pipeline_lib.data.tables import split_report
    from stages import prepare as prepare_stage

    prepared = env["prepared"]
    out = env["tmp"] / "figures_run"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    dataset_dir = env["trained"] / prepared.info["dataset_dir"]
    summary = split_report(prepared, ["train", "val"], [])[0]
    monkeypatch.chdir(out)
    prepare_stage.write_figures(prepared, dataset_dir, summary, parse_params(raw))
    return str(
        sorted(
            (p.name, Image.open(p).size) for p in (out / "reports/prepare/figures").glob("*.png")
        )
    )


def synthetic_probe(raw: dict, env: dict) -> str:
    """The synthetic dataset: every file it writes."""
    from pipeline_lib.data.synthetic import generate_dataset

    out = env["tmp"] / "synthetic"
    shutil.rmtree(out, ignore_errors=True)
    generate_dataset(out, parse_params(raw).data.synthetic, workers=1, progress=False)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    return digest([(p.relative_to(out).as_posix(), p.read_bytes()) for p in files])


def finetune_probe(raw: dict, env: dict, monkeypatch) -> str:
    """The fine-tuning job the stage builds: its loop's settings, what trains, the loaders'
    batches and workers, the augmented images."""
    from pipeline_lib.training import finetuning
    from pipeline_lib.training.finetuning import finetune_job, read_frozen, training_device

    monkeypatch.setattr(finetuning, "load_backbone", cached_backbone)

    params = parse_params(raw)
    ft = params.finetune
    monkeypatch.chdir(env["trained"])  # the prepared tables name the images relative to it
    device = training_device(ft.device)
    checkpoint, prepared = read_frozen(
        env["trained"] / "models/multi.safetensors", env["prepared_dir"]
    )
    job = finetune_job(checkpoint, prepared, params, device)
    torch.manual_seed(0)
    images, *targets = next(iter(job.train.loader))
    loader = job.train.loader
    config = vars(job.config)
    return digest(
        config, job.model.trainable_units, loader.batch_size, loader.num_workers, images, *targets
    )


def finetune_stage_probe(raw: dict, env: dict, monkeypatch) -> str:
    """The finetune stage: whether it trains (or writes a note), and whether under torchrun."""
    from stages import finetune as finetune_stage

    calls = []

    def restart(processes, module, *args):
        calls.append(("torchrun", processes))

    monkeypatch.setattr(finetune_stage, "restart_under_torchrun", restart)
    monkeypatch.setattr(finetune_stage, "finetune", lambda params, progress: calls.append("train"))
    folder = env["tmp"] / "finetune"
    folder.mkdir(exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(folder)
    finetune_stage.train(Path("params.yaml"), False)
    return str(calls)


# --- the table: key -> (probe, value a, value b, changes to the base params) -------------------

TASK_GRID, TASK_SINGLE = task_probe("grid"), task_probe("single")
EVAL_GRID, EVAL_SINGLE = report_probe("grid"), report_probe("single")
ANCHORED = {"grid.anchors": 3}
FINE = {"fine": True}  # the task probe on features with a second level
FLIPS = {"train.hflip": 0.5}
ENABLED = {"finetune.enabled": True}
# the conv grid head: keys the default (fcos, torchvision's own assignment and losses) does not read
CONV = {"head.grid_kind": "conv"}

PROBES = {
    "data.source": (source_probe, "synthetic", "voc", {"data.root": "VOC"}),
    "data.root": (source_probe, "VOC", "VOC_other", {"data.source": "voc"}),
    "data.year": (source_probe, 2007, 2012, {"data.source": "voc", "data.root": "VOC"}),
    "data.train_split": (
        source_probe,
        "train",
        "trainval",
        {"data.source": "voc", "data.root": "VOC"},
    ),
    "data.val_split": (source_probe, "val", "test", {"data.source": "voc", "data.root": "VOC"}),
    "data.download": (
        source_probe,
        False,
        True,
        {"data.source": "voc", "data.root": "VOC/VOCdevkit", "data.year": 2012},
    ),
    "data.on_error": (
        source_probe,
        "raise",
        "skip",
        {"data.source": "voc", "data.root": "VOC_broken"},
    ),
    "data.synthetic.seed": (synthetic_probe, 0, 1, {}),
    "data.synthetic.n_train": (synthetic_probe, 3, 4, {}),
    "data.synthetic.n_val": (synthetic_probe, 2, 1, {}),
    "data.synthetic.classes": (synthetic_probe, ["circle", "square"], ["circle", "star"], {}),
    "data.synthetic.min_side": (synthetic_probe, 96, 64, {}),
    "data.synthetic.max_side": (synthetic_probe, 128, 160, {}),
    "data.synthetic.max_objects": (synthetic_probe, 6, 1, {}),
    "data.synthetic.difficult_below": (synthetic_probe, 12, 60, {}),
    "image.mode": (extract_probe, "shrink", "crop", {}),
    "image.size": (extract_probe, 64, 96, {}),
    "report.samples": (figures_probe, 1, 2, {}),
    "report.mode_samples": (figures_probe, 1, 2, {}),
    "backbone.name": (
        extract_probe,
        "efficientnet_lite0",
        "resnet18",
        {"backbone.weights": "random"},
    ),
    "backbone.layer": (extract_probe, "auto", "head", {}),
    "backbone.weights": (extract_probe, "imagenet", "random", {}),
    "backbone.device": (extract_probe, "cpu", "cuda", {}),
    "backbone.store_dtype": (extract_probe, "float16", "float32", {}),
    "backbone.precision": (extract_probe, "float32", "bfloat16", {}),
    "backbone.batch_size": (extract_probe, 2, 3, {}),
    "backbone.workers": (extract_probe, 0, 2, {}),
    "backbone.compile": (extract_probe, False, True, {}),
    "backbone.fine_layer": (extract_probe, "none", "blocks.4", {}),
    "backbone.processes": (extract_stage_probe, 1, 2, {}),
    "backbone.hflip": (extract_stage_probe, False, True, {}),
    "head.dropout": (TASK_GRID, 0.0, 0.5, CONV),
    "head.hidden": (TASK_SINGLE, 16, 8, {"head.single_kind": "lab"}),
    "head.classifier": (TASK_SINGLE, "pooled", "flatten", {"head.single_kind": "lab"}),
    "head.classifier_dropout": (TASK_SINGLE, 0.0, 0.5, {"head.single_kind": "lab"}),
    "head.single_kind": (TASK_SINGLE, "spatial", "lab", {}),
    "head.grid_hidden": (TASK_GRID, 16, 8, {"head.grid_kind": "lab", "grid.assign": "centre"}),
    "head.grid_kind": (TASK_GRID, "conv", "fcos", {}),
    "head.conv_width": (TASK_GRID, 32, 64, CONV),
    "head.conv_depth": (TASK_GRID, 2, 1, CONV),
    "head.tower_width": (TASK_GRID, 32, 64, {"head.grid_kind": "fcos"}),
    "head.tower_depth": (TASK_GRID, 2, 1, {"head.grid_kind": "fcos"}),
    "train.seed": (fit_probe, 0, 1, {}),
    "train.epochs": (fit_probe, 2, 3, {}),
    "train.batch_size": (fit_probe, 4, 6, {}),
    "train.lr": (fit_probe, 0.001, 0.01, {}),
    "train.weight_decay": (fit_probe, 0.0001, 0.5, {}),
    "train.lr_schedule": (fit_probe, "cosine", "constant", {}),
    "train.ema_decay": (fit_probe, 0.0, 0.5, {}),
    "train.warmup_epochs": (fit_probe, 0.0, 1.0, {}),
    "train.monitor": (
        fit_probe,
        "last",
        "loss",
        {**CONV, "train.lr": 1.0, "train.lr_schedule": "constant", "train.warmup_epochs": 0.0},
    ),
    "train.box_weight": (TASK_GRID, 1.0, 2.0, CONV),
    "train.class_weight": (TASK_GRID, 1.0, 2.0, CONV),
    "train.obj_weight": (TASK_GRID, 1.0, 2.0, CONV),
    "train.box_loss": (TASK_GRID, "ciou", "smooth_l1", CONV),
    "train.obj_loss": (TASK_GRID, "focal", "bce", CONV),
    "train.focal_gamma": (TASK_GRID, 2.0, 1.0, CONV),
    "train.focal_alpha": (TASK_GRID, 0.25, 0.5, CONV),
    "train.obj_target": (TASK_GRID, "iou", "binary", CONV),
    "train.device": (fit_probe, "cpu", "cuda", {}),
    "train.cpu_kernels": (kernels_probe, "avx2", "native", {}),
    "train.features": (lazy_probe, "disk", "memory", {}),
    "train.hflip": (TASK_GRID, 0.0, 0.5, {"train.hflip_from": "mirrored"}),
    "train.hflip_from": (TASK_GRID, "extracted", "mirrored", {**FLIPS, "flipped": True}),
    "grid.num_cells": (TASK_GRID, 14, 7, CONV),
    "grid.anchors": (TASK_GRID, 0, 3, CONV),
    "grid.anchor_ratio": (TASK_GRID, 4.0, 1.5, {**CONV, **ANCHORED}),
    "grid.fine_below": (TASK_GRID, 0.2, 0.05, {**CONV, **FINE}),
    "grid.assign": (TASK_GRID, "neighbours", "centre", CONV),
    "eval.score_threshold": (EVAL_GRID, 0.0, 0.5, {}),
    "eval.draw_score": (EVAL_GRID, 0.0, 0.9, {}),
    "eval.nms_iou": (EVAL_GRID, 0.5, 0.05, {}),
    "eval.iou_threshold": (EVAL_GRID, 0.5, 0.05, {}),
    "eval.max_detections": (EVAL_GRID, 100, 1, {}),
    "eval.samples": (EVAL_SINGLE, 1, 2, {}),
    "eval.bootstrap": (EVAL_SINGLE, 1000, 200, {}),
    "eval.confidence": (EVAL_GRID, 0.95, 0.5, {}),
    "finetune.enabled": (finetune_stage_probe, False, True, {}),
    "finetune.processes": (finetune_stage_probe, 1, 2, ENABLED),
    "finetune.seed": (finetune_probe, 0, 1, {}),
    "finetune.epochs": (finetune_probe, 5, 2, {}),
    "finetune.batch_size": (finetune_probe, 4, 3, {}),
    "finetune.lr": (finetune_probe, 0.0001, 0.001, {}),
    "finetune.weight_decay": (finetune_probe, 0.0001, 0.5, {}),
    "finetune.lr_schedule": (finetune_probe, "constant", "cosine", {}),
    "finetune.monitor": (finetune_probe, "loss", "last", {}),
    "finetune.unfreeze": (finetune_probe, 3, 1, {}),
    "finetune.hflip": (finetune_probe, 0.0, 1.0, {}),
    "finetune.scale_jitter": (finetune_probe, 0.0, 0.5, {}),
    "finetune.translate": (finetune_probe, 0.0, 0.4, {}),
    "finetune.color_jitter": (finetune_probe, 0.0, 0.9, {}),
    "finetune.workers": (finetune_probe, 0, 1, {}),
    "finetune.device": (finetune_probe, "cpu", "cuda", {}),
}
NEEDS_MONKEYPATCH = {
    EVAL_GRID,
    EVAL_SINGLE,
    lazy_probe,
    kernels_probe,
    extract_probe,
    extract_stage_probe,
    source_probe,
    figures_probe,
    finetune_probe,
    finetune_stage_probe,
}


def test_every_key_has_a_probe():
    keys = leaf_keys(yaml.safe_load((REPO / "params.yaml").read_text()))
    assert sorted(set(keys) - set(PROBES)) == [], "keys of params.yaml without a probe"
    assert sorted(set(PROBES) - set(keys)) == [], "probes of keys params.yaml lacks"


def fine_inputs(inputs):
    """The tiny set's training inputs with a second, fine feature level (random, packed)."""
    from pipeline_lib.features.featurefiles import Features

    fine = 8
    made = copy.copy(inputs)
    made.features = {}
    for split, found in inputs.features.items():
        tensor = found.features
        extra = torch.randn(len(tensor), 4 * fine, *tensor.shape[-2:]).to(tensor.dtype)
        metadata = copy.deepcopy(found.metadata)
        metadata["backbone"]["fine_channels"] = fine
        made.features[split] = Features(torch.cat([tensor, extra], 1), found.image_ids, metadata)
    return made


@pytest.fixture(scope="module")
def env(trained, tmp_path_factory) -> dict:
    """What the probes read: the tiny set's inputs and models, small VOC folders, photos."""
    built_once(tmp_path_factory, "test_params_effects")
    tmp = tmp_path_factory.mktemp("effects")
    from pipeline_lib.data.tables import read_prepared

    root = tmp / "VOC"
    write_tiny_voc(root / "VOC2007", {"train": 4, "val": 3, "trainval": 0, "test": 0})
    (root / "VOC2007/ImageSets/Main/trainval.txt").write_text("000000\n000001\n000004\n")
    (root / "VOC2007/ImageSets/Main/test.txt").write_text("000005\n000006\n")
    write_tiny_voc(root / "VOC2012", {"train": 2, "val": 2}, seed=5)
    write_tiny_voc(tmp / "VOC_other" / "VOC2007", {"train": 3, "val": 2}, seed=9)
    broken = tmp / "VOC_broken" / "VOC2007"
    write_tiny_voc(broken, {"train": 3, "val": 2}, seed=3)
    (broken / "Annotations/000001.xml").write_text("<annotation><oops></annotation>")
    (tmp / "VOC" / "VOCdevkit").symlink_to(root, target_is_directory=True)
    inputs = read_training_inputs(trained / "data/prepared", trained / "data/features")
    flipped = copy.copy(inputs)
    flipped.features = dict(inputs.features, train_flipped=inputs.features["train"])
    photos = {}
    for k in range(3):
        photo = tmp / f"photo{k}.jpg"
        Image.effect_noise((90 + 10 * k, 80), 50 + 20 * k).convert("RGB").save(photo)
        photos[f"p{k}"] = photo
    models = trained / "models"
    features = trained / "data/features/val.safetensors"
    return {
        "tmp": tmp,
        "trained": trained,
        "inputs": inputs,
        "fine_inputs": fine_inputs(inputs),
        "flipped_inputs": flipped,
        "prepared": read_prepared(trained / "data/prepared"),
        "prepared_dir": trained / "data/prepared",
        "synthetic": trained / "data/synthetic/VOCdevkit/VOCshapes",
        "photos": photos,
        "evaluation_grid": read_evaluation_inputs(
            models / "multi.safetensors", trained / "data/prepared", features
        ),
        "evaluation_single": read_evaluation_inputs(
            models / "single.safetensors", trained / "data/prepared", features
        ),
    }


def base_params(env: dict, changes: dict) -> dict:
    raw = tiny_params(yaml.safe_load((REPO / "params.yaml").read_text()), 3, 2)
    raw["image"]["size"] = 64
    raw["grid"]["num_cells"] = 14
    raw["finetune"].update(batch_size=4, workers=0, device="cpu")
    raw["backbone"].update(batch_size=2, device="cpu", precision="float32")
    raw["train"]["device"] = "cpu"
    raw["eval"]["samples"] = 1
    raw["head"]["tower_width"] = 32  # FCOS's GroupNorm needs a multiple of 32
    for key, value in changes.items():
        if key in ("fine", "flipped"):
            continue
        if key.startswith("data.root"):
            value = str(env["tmp"] / value)
        raw = with_param(raw, key, value)
    return raw


@pytest.mark.parametrize("key", sorted(PROBES))
def test_a_non_default_value_changes_what_it_should(key, env, monkeypatch):
    probe, a, b, changes = PROBES[key]
    run_env = dict(env)
    if changes.get("fine"):
        run_env["inputs"] = env["fine_inputs"]
    if changes.get("flipped"):
        run_env["inputs"] = env["flipped_inputs"]
    results = []
    for value in (a, b):
        if key == "data.root":
            value = str(env["tmp"] / value)
        raw = with_param(base_params(env, changes), key, value)
        with monkeypatch.context() as patch:
            args = (raw, run_env, patch) if probe in NEEDS_MONKEYPATCH else (raw, run_env)
            results.append(outcome(probe, *args))
    assert results[0] != results[1], f"{key}: {a!r} and {b!r} give the same result ({results[0]})"
    assert not all(r.startswith("error") for r in results), results
