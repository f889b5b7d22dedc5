"""Stages finetune and evaluate_finetune (opt-in, finetune.enabled): the grid head and the
backbone's last units trained end to end from augmented images, starting from
models/multi.safetensors, then both models measured on the val images.

    python -m stages.finetune train [--params params.yaml] [--no-progress]
    python -m stages.finetune evaluate [--params params.yaml]

`train` writes
- models/finetuned/model.safetensors: backbone and head in one file, used like the other models
  (`python -m stages.predict photo.jpg --model models/finetuned/model.safetensors`),
- reports/finetune/metrics.json (DVC metrics): the best epoch (lowest val loss) and its val
  measures, seconds per epoch, the units and parameters trained,
- reports/finetune/figures/training_curves.png.
`evaluate` writes reports/evaluate_finetune/metrics.json (DVC metrics): PASCAL VOC mAP on val of
the frozen-feature model (run here on the same images) and of the fine-tuned one, the gain, and
both per-class APs; and reports/evaluate_finetune/figures/per_class_ap.png (both, side by side).
With finetune.enabled: false both only write notes saying so and metrics {"enabled": false}, in a
second: torch is not even imported.
"""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline_lib.errors import PipelineError
from pipeline_lib.files import atomic_dir, write_json
from pipeline_lib.params import Params, load_params
from stages.common import MODELS_DIR, PARAMS_OPTION, PREPARED_DIR, REPORTS_DIR, clean_errors

FROZEN_MODEL = MODELS_DIR / "multi.safetensors"
MODEL_DIR = MODELS_DIR / "finetuned"
TRAIN_DIR = REPORTS_DIR / "finetune"
EVAL_DIR = REPORTS_DIR / "evaluate_finetune"
SPLITS = ("train", "val")

app = typer.Typer(add_completion=False, help="Fine-tune backbone and grid head (opt-in).")


@app.callback()
def main() -> None:
    """Both commands are no-ops unless finetune.enabled."""


@app.command()
def train(params_file: Path = PARAMS_OPTION, progress: bool = True) -> None:
    """Train the backbone's last units and the grid head on augmented images."""
    with clean_errors():
        params = load_params(params_file)
        if not params.finetune.enabled:
            write_disabled([MODEL_DIR, TRAIN_DIR / "figures"], TRAIN_DIR / "metrics.json")
            return
        finetune(params, progress)


@app.command()
def evaluate(params_file: Path = PARAMS_OPTION) -> None:
    """VOC mAP on val of the frozen-feature model and of the fine-tuned one."""
    with clean_errors():
        params = load_params(params_file)
        if not params.finetune.enabled:
            write_disabled([EVAL_DIR / "figures"], EVAL_DIR / "metrics.json")
            return
        compare(params)


def write_disabled(folders: list[Path], metrics: Path) -> None:
    note = ("finetune.enabled is false in params.yaml: nothing was done.\n"
            "Set it to true and run `dvc repro evaluate_finetune` (see README).\n")  # fmt: skip
    for folder in folders:
        with atomic_dir(folder) as tmp:
            (tmp / "README.txt").write_text(note)
    write_json(metrics, {"enabled": False})
    typer.echo("finetune.enabled is false: nothing to do")


def finetune(params: Params, progress: bool) -> None:
    # Imported here so that the disabled stages, which every `dvc repro` runs, take a second.
    from pipeline_lib.backbones import load_backbone
    from pipeline_lib.features import pick_device
    from pipeline_lib.finetuning import FineTuner, ImageBatches, trainable_parameters
    from pipeline_lib.heads import save_checkpoint
    from pipeline_lib.losses import multi_object_loss
    from pipeline_lib.metrics import multi_object_batch_sums
    from pipeline_lib.plots import save_figure, training_curves
    from pipeline_lib.training import TrainConfig, fit, seed_everything

    ft, train = params.finetune, params.train
    seed_everything(ft.seed)
    checkpoint, prepared = load_frozen()
    info = checkpoint.info
    spec = info["backbone"]
    device = pick_device(ft.device)
    loaders = {split: image_loader(params, checkpoint, prepared, split, device)
               for split in SPLITS}  # fmt: skip
    backbone = load_backbone(spec["name"], spec["layer"], spec["weights"])
    model = FineTuner(backbone, checkpoint.head, ft.unfreeze).to(device)
    n_trainable = trainable_parameters(model)
    units = ", ".join(model.trainable_units) or "no backbone unit"
    typer.echo(f"training {units} and the head ({n_trainable:,} parameters) on "
               f"{len(loaders['train'].dataset)} images, {device}")  # fmt: skip

    def loss_fn(outputs, targets):
        return multi_object_loss(*outputs, *targets, train.box_weight, train.class_weight,
                                 train.obj_weight, train.obj_loss, train.focal_gamma,
                                 train.focal_alpha)  # fmt: skip

    def on_epoch(epoch: int, stats: dict) -> None:
        tr, va = stats["train"], stats["val"]
        typer.echo(f"epoch {epoch:3d}/{ft.epochs}: train loss {tr['loss']:.4f} | val loss "
                   f"{va['loss']:.4f} acc {va['accuracy']:.3f} iou {va['iou']:.3f}")  # fmt: skip

    config = TrainConfig(ft.epochs, ft.batch_size, ft.lr, ft.weight_decay, "constant", ft.seed,
                         "loss", str(device))  # fmt: skip
    result = fit(model, ImageBatches(loaders["train"]), ImageBatches(loaders["val"]), loss_fn,
                 multi_object_batch_sums, config, on_epoch, progress)  # fmt: skip
    model.load_state_dict(result.best_state)
    metrics = {
        "enabled": True,
        "images": {split: len(loaders[split].dataset) for split in SPLITS},
        "best": {"epoch": result.best_epoch,
                 **{f"val_{k}": round(v, 6) for k, v in
                    result.history[result.best_epoch - 1]["val"].items()}},
        "epochs": ft.epochs,
        "seconds_per_epoch": round(result.seconds / ft.epochs, 1),
        "trainable_units": model.trainable_units,
        "trainable_parameters": n_trainable,
        "device": str(device),
    }  # fmt: skip
    summary = {"best_epoch": result.best_epoch, "epochs": ft.epochs,
               "trainable_units": model.trainable_units}  # fmt: skip
    tuned = {**info, "feature_dtype": "float32", "finetuned": summary}
    with atomic_dir(MODEL_DIR) as tmp:
        save_checkpoint(tmp / "model.safetensors", checkpoint.head, tuned, backbone.module)
    with atomic_dir(TRAIN_DIR / "figures") as tmp:
        save_figure(training_curves(result.history, result.best_epoch, "fine-tuning"),
                    tmp / "training_curves.png")  # fmt: skip
    write_json(TRAIN_DIR / "metrics.json", metrics)
    typer.echo(f"best epoch {result.best_epoch} (val loss {result.best_monitor:.4f}); "
               f"{metrics['seconds_per_epoch']} s/epoch -> {MODEL_DIR}")  # fmt: skip


def compare(params: Params) -> None:
    """mAP on val of the frozen-feature model and of the fine-tuned one, from the same images."""

    from pipeline_lib.backbones import load_backbone
    from pipeline_lib.detection import grid_detections
    from pipeline_lib.features import pick_device
    from pipeline_lib.finetuning import FineTuner, grid_outputs
    from pipeline_lib.heads import load_checkpoint
    from pipeline_lib.metrics import OVERLAP_OF_SOURCE, mean_ap, voc_average_precision
    from pipeline_lib.plots import ap_chart, save_figure
    from pipeline_lib.targets import ground_truth

    ev = params.eval
    frozen, prepared = load_frozen()
    tuned = load_checkpoint(MODEL_DIR / "model.safetensors")
    if tuned.backbone_state is None or tuned.info["backbone"] != frozen.info["backbone"]:
        raise PipelineError(f"{MODEL_DIR / 'model.safetensors'} is not a fine-tuned "
                            f"{FROZEN_MODEL}: run dvc repro finetune")  # fmt: skip
    info = frozen.info
    spec, mode, size = info["backbone"], info["image_mode"], info["image_size"]
    device = pick_device(params.finetune.device)
    loader = image_loader(params, frozen, prepared, "val", device)
    val = prepared.images[prepared.images["split"] == "val"]
    sizes = [(int(w), int(h)) for w, h in zip(val["width"], val["height"], strict=True)]
    truth = ground_truth(prepared.objects, val["image_id"].tolist())
    overlap = OVERLAP_OF_SOURCE[prepared.info["source"]]
    results = {}
    for name, checkpoint in (("frozen", frozen), ("finetuned", tuned)):
        backbone = load_backbone(spec["name"], spec["layer"], spec["weights"])
        if checkpoint.backbone_state is not None:
            backbone.module.load_state_dict(checkpoint.backbone_state)
        model = FineTuner(backbone, checkpoint.head, unfreeze=0).to(device)
        pred_boxes, logits = grid_outputs(model, loader, device)
        found = grid_detections(pred_boxes, logits, sizes, mode, size, ev.score_threshold,
                                ev.nms_iou, ev.max_detections)  # fmt: skip
        found = [(d.boxes, d.scores, d.labels) for d in found]
        results[name] = voc_average_precision(found, truth, len(prepared.classes),
                                              ev.iou_threshold, overlap)  # fmt: skip
    before, after = (mean_ap(results[name]) for name in ("frozen", "finetuned"))
    classes = prepared.classes
    metrics = {
        "enabled": True,
        "images": len(val),
        "iou_threshold": ev.iou_threshold,
        "overlap": overlap,
        "map_frozen": round(before, 4),
        "map": round(after, 4),
        "gain": round(after - before, 4),
        **{f"per_class_ap_{name}": {n: None if c.ap is None else round(c.ap, 4)
                                    for n, c in zip(classes, per_class, strict=True)}
           for name, per_class in results.items()},
    }  # fmt: skip
    with atomic_dir(EVAL_DIR / "figures") as tmp:
        for name in results:
            save_figure(ap_chart(metrics[f"per_class_ap_{name}"],
                                 f"AP@{ev.iou_threshold} per class, {name} (val)"),
                        tmp / f"per_class_ap_{name}.png")  # fmt: skip
    write_json(EVAL_DIR / "metrics.json", metrics)
    typer.echo(f"val mAP@{ev.iou_threshold}: {metrics['map_frozen']:.4f} frozen features, "
               f"{metrics['map']:.4f} fine-tuned (gain {metrics['gain']:+.4f}) -> "
               f"{EVAL_DIR / 'metrics.json'}")  # fmt: skip


def load_frozen():
    """The frozen-feature grid model (checked to be rebuildable) and the prepared tables."""
    from pipeline_lib.features import check_mode
    from pipeline_lib.heads import load_checkpoint
    from pipeline_lib.tables import read_prepared

    checkpoint = load_checkpoint(FROZEN_MODEL)
    spec = checkpoint.info["backbone"]
    if checkpoint.info.get("fine_channels"):
        raise PipelineError(f"{FROZEN_MODEL} is a two-level grid head (backbone.fine_layer): "
                            "fine-tuning it is not supported yet; set backbone.fine_layer: "
                            "none")  # fmt: skip
    check_mode(checkpoint.info["image_mode"])
    if spec["weights"] != "imagenet":
        raise PipelineError(f"{FROZEN_MODEL}: trained on a randomly initialised {spec['name']}, "
                            "which cannot be rebuilt to fine-tune; use backbone.weights: "
                            "imagenet")  # fmt: skip
    prepared = read_prepared(PREPARED_DIR)
    if prepared.classes != checkpoint.classes:
        raise PipelineError(f"data/prepared has classes {prepared.classes} but {FROZEN_MODEL} "
                            f"was trained on {checkpoint.classes}: run dvc repro")  # fmt: skip
    return checkpoint, prepared


def image_loader(params: Params, checkpoint, prepared, split: str, device):
    """A DataLoader of GridImages for `split` (augmented for train, shuffled with finetune.seed),
    with the image mode, grid and anchors of `checkpoint`."""
    import torch
    from torch.utils.data import DataLoader

    from pipeline_lib.features import pick_workers
    from pipeline_lib.finetuning import GridImages, augmentation, image_objects

    ft, info = params.finetune, checkpoint.info
    mode, size = info["image_mode"], info["image_size"]
    rows = prepared.images[prepared.images["split"] == split]
    ids = rows["image_id"].tolist()
    transform = None
    if split == "train":
        transform = augmentation(ft.hflip, ft.scale_jitter, ft.translate, ft.color_jitter)
    anchors = checkpoint.head.anchors if checkpoint.head.n_anchors else None
    dataset_dir = Path(prepared.info["dataset_dir"])
    data = GridImages([dataset_dir / p for p in rows["path"]],
                      image_objects(prepared.images, prepared.objects, ids, mode, size), mode,
                      size, info["num_cells"], anchors, transform)  # fmt: skip
    return DataLoader(data, batch_size=ft.batch_size, shuffle=split == "train",
                      num_workers=pick_workers(ft.workers, device),
                      generator=torch.Generator().manual_seed(ft.seed),
                      pin_memory=device.type == "cuda")  # fmt: skip


if __name__ == "__main__":
    app()
