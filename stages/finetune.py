"""Stages finetune and evaluate_finetune (opt-in, finetune.enabled): the multi-object head and the
backbone's last units trained end to end from augmented images, starting from
models/multi.safetensors, then both models measured on the val images.

    python -m stages.finetune train [--params params.yaml] [--no-progress]
    python -m stages.finetune evaluate [--params params.yaml]

`train` writes
- models/finetuned/model.safetensors: backbone and head in one file, used like the other models
  (`python -m stages.predict photo.jpg --model models/finetuned/model.safetensors`),
- reports/finetune/metrics.json (DVC metrics): the epoch kept (finetune.monitor) and its val
  measures, seconds per epoch, the units and parameters trained,
- reports/finetune/figures/training_curves.png.
`evaluate` writes reports/evaluate_finetune/metrics.json (DVC metrics): PASCAL VOC mAP on val of
the frozen-feature model (run here on the same images) and of the fine-tuned one, and the gain;
and reports/evaluate_finetune/figures/per_class_ap_{frozen,finetuned}.png (AP per class of each).
With finetune.enabled: false both only write notes saying so and metrics {"enabled": false}, in a
second: torch is not even imported.
"""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline_lib.base.errors import PipelineError
from pipeline_lib.base.files import atomic_dir, write_json
from pipeline_lib.base.params import Params, load_params
from stages import common
from stages.common import (
    MODELS_DIR,
    PARAMS_OPTION,
    PREPARED_DIR,
    REPORTS_DIR,
    clean_errors,
    command_group,
    restart_under_torchrun,
)

FROZEN_MODEL = MODELS_DIR / "multi.safetensors"
MODEL_DIR = MODELS_DIR / "finetuned"
TRAIN_DIR = REPORTS_DIR / "finetune"
EVAL_DIR = REPORTS_DIR / "evaluate_finetune"

app = command_group(
    "Fine-tune backbone and multi-object head (opt-in; no-ops unless finetune.enabled)."
)


@app.command()
def train(params_file: Path = PARAMS_OPTION, progress: bool = True) -> None:
    """Train the backbone's last units and the multi-object head on augmented images."""
    with clean_errors():
        params = load_params(params_file)
        if not params.finetune.enabled:
            write_disabled([MODEL_DIR, TRAIN_DIR / "figures"], TRAIN_DIR / "metrics.json")
            return
        args = ["train", "--params", str(params_file)] + ([] if progress else ["--no-progress"])
        restart_under_torchrun(params.finetune.processes, "stages.finetune", *args)
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
    note = (
        "finetune.enabled is false in params.yaml: nothing was done.\n"
        "Set it to true and run `dvc repro evaluate_finetune` (see README).\n"
    )
    for folder in folders:
        with atomic_dir(folder) as tmp:
            (tmp / "README.txt").write_text(note)
    write_json(metrics, {"enabled": False})
    typer.echo("finetune.enabled is false: nothing to do")


def finetune(params: Params, progress: bool) -> None:
    """Train, keep an epoch (finetune.monitor), save model, metrics and curves. Under
    torchrun every process trains its share (DDP) and rank 0 alone writes and prints."""
    # Imported here so that the disabled stages, which every `dvc repro` runs, take a second.
    from pipeline_lib.base import distributed
    from pipeline_lib.training.finetuning import finetune_job, read_frozen, training_device
    from pipeline_lib.training.loop import epoch_line, fit, seed_everything

    ft = params.finetune
    ranks = distributed.start("nccl" if training_device(ft.device).type == "cuda" else "gloo")
    try:
        device = training_device(ft.device, ranks)
        seed_everything(ft.seed + ranks.rank)  # each rank its own augmentation draws
        frozen, prepared = read_frozen(FROZEN_MODEL, PREPARED_DIR)
        job = finetune_job(frozen, prepared, params, device, ranks)
        if ranks.main:
            typer.echo(job.describe())

        def on_epoch(epoch: int, stats: dict) -> None:
            if ranks.main:
                typer.echo(epoch_line(epoch, ft.epochs, stats))

        show = progress and ranks.main
        result = fit(job.trained, job.train, job.val, job.objective, job.config, on_epoch, show)
        if ranks.main:
            save_finetuned(job, frozen, result)
    finally:
        distributed.stop()


def save_finetuned(job, frozen, result) -> None:
    """models/finetuned/, reports/finetune/: the kept epoch's model, curves and metrics."""
    from pipeline_lib.models.checkpoints import save_checkpoint
    from pipeline_lib.reporting.plots import save_figure, training_curves

    job.model.load_state_dict(result.best_state)
    with atomic_dir(MODEL_DIR) as tmp:
        card = job.card(frozen.card, result)
        save_checkpoint(tmp / "model.safetensors", frozen.head, card, job.backbone.module)
    with atomic_dir(TRAIN_DIR / "figures") as tmp:
        curves = training_curves(result.history, result.best_epoch, "fine-tuning")
        save_figure(curves, tmp / "training_curves.png")
    metrics = job.metrics(result)
    write_json(TRAIN_DIR / "metrics.json", metrics)
    typer.echo(
        f"kept epoch {result.best_epoch} ({job.config.monitor}: val loss "
        f"{result.best_monitor:.4f}); "
        f"{metrics['seconds_per_epoch']} s/epoch -> {MODEL_DIR}"
    )


def compare(params: Params) -> None:
    """mAP on val of the frozen-feature model and of the fine-tuned one, from the same images."""
    from pipeline_lib.features.devices import pick_device
    from pipeline_lib.measures.metrics import OVERLAP_OF_SOURCE
    from pipeline_lib.models.checkpoints import load_checkpoint
    from pipeline_lib.reporting.plots import ap_chart, save_figure
    from pipeline_lib.training.finetuning import (
        compare_models,
        comparison_metrics,
        finetuned_from,
        image_loader,
        read_frozen,
    )

    ev = params.eval
    frozen, prepared = read_frozen(FROZEN_MODEL, PREPARED_DIR)
    tuned = load_checkpoint(MODEL_DIR / "model.safetensors")
    if not finetuned_from(tuned, frozen):
        raise PipelineError(
            f"{MODEL_DIR / 'model.safetensors'} is not a fine-tuned {FROZEN_MODEL}: "
            "run dvc repro finetune"
        )
    device = pick_device(params.finetune.device, "finetune.device")
    loader = image_loader(params.finetune, frozen, prepared, "val", device)
    results = compare_models({"frozen": frozen, "finetuned": tuned}, prepared, loader, ev, device)
    overlap = OVERLAP_OF_SOURCE[prepared.info["source"]]
    metrics = comparison_metrics(results, len(loader.dataset), ev, overlap)
    with atomic_dir(EVAL_DIR / "figures") as tmp:
        for name in results:
            title = f"AP@{ev.iou_threshold} per class, {name} (val)"
            chart = ap_chart(results[name].per_class_ap(), title)
            save_figure(chart, tmp / f"per_class_ap_{name}.png")
    write_json(EVAL_DIR / "metrics.json", metrics)
    typer.echo(
        f"val mAP@{ev.iou_threshold}: {metrics['map_frozen']:.4f} frozen features, "
        f"{metrics['map']:.4f} fine-tuned (gain {metrics['gain']:+.4f}) -> {EVAL_DIR}/metrics.json"
    )


if __name__ == "__main__":
    common.main(app)
