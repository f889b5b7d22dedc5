"""Stage train_single: train a detection head on the cached features.

    python -m stages.train single [--params params.yaml]

Writes
- models/single.safetensors: the head of the best epoch (train.monitor on val) with everything
  needed to use it: backbone, layer, normalisation, image mode and size, classes, head params
  (see pipeline_lib/heads.py),
- reports/train_single/: dvclive's logs -- metrics.json (last epoch, plus the best epoch under
  "best") and plots/metrics/{train,val}/*.tsv (one row per epoch) -- and training_curves.png.
"""

from __future__ import annotations

from pathlib import Path

import typer
from dvclive import Live

from pipeline_lib.errors import PipelineError
from pipeline_lib.features import pick_device, read_features
from pipeline_lib.heads import SingleObjectHead, save_checkpoint
from pipeline_lib.losses import single_object_loss
from pipeline_lib.metrics import single_object_batch_sums
from pipeline_lib.params import load_params
from pipeline_lib.plots import save_figure, training_curves
from pipeline_lib.tables import read_prepared
from pipeline_lib.targets import single_object_targets
from pipeline_lib.training import Dataset, TrainConfig, fit, seed_everything
from stages.common import (
    FEATURES_DIR,
    MODELS_DIR,
    PARAMS_OPTION,
    PREPARED_DIR,
    REPORTS_DIR,
    clean_errors,
)

app = typer.Typer(add_completion=False, help="Train a head on the cached features.")

CURVES = ("loss", "box_loss", "class_loss", "accuracy", "iou")


@app.callback()
def main() -> None:
    """One command per head kind (keeps `single` a subcommand)."""


@app.command()
def single(params_file: Path = PARAMS_OPTION, progress: bool = True) -> None:
    """Single-object head: class and box of each image's largest object."""
    with clean_errors():
        params = load_params(params_file)
        head_params, train = params.head, params.train
        seed_everything(train.seed)
        prepared = read_prepared(PREPARED_DIR)
        features = {s: read_features(FEATURES_DIR / f"{s}.safetensors") for s in ("train", "val")}
        metadata = features["train"].metadata
        mode, size = metadata["image_mode"], int(metadata["image_size"])
        data, dropped = {}, {}
        for split in ("train", "val"):
            ids, tensor = features[split].image_ids, features[split].features
            targets = single_object_targets(prepared.images, prepared.objects, ids, mode, size)
            keep = targets.present
            data[split] = Dataset(tensor[keep], (targets.boxes[keep], targets.labels[keep]))
            dropped[split] = int((~keep).sum())
            if not keep.any():
                raise PipelineError(
                    f"{split}: none of {len(ids)} images has an object left after image.mode "
                    f"{mode} (size {size}); nothing to train or validate on"
                )
            if dropped[split]:
                message = f"{dropped[split]} images have no object after image.mode {mode}"
                typer.secho(f"warning: {split}: {message}; left out", err=True, fg="yellow")
        feature_shape = tuple(data["train"].features.shape[1:])
        head = SingleObjectHead(
            feature_shape,
            len(prepared.classes),
            hidden=head_params.hidden,
            dropout=head_params.dropout,
            classifier=head_params.classifier,
            classifier_dropout=head_params.classifier_dropout,
        )

        def loss_fn(outputs, targets):
            return single_object_loss(*outputs, *targets, train.box_weight, train.class_weight)

        config = TrainConfig(train.epochs, train.batch_size, train.lr, train.weight_decay,
                             train.lr_schedule, train.seed, train.monitor,
                             str(pick_device(train.device)))  # fmt: skip
        reports = REPORTS_DIR / "train_single"
        with Live(dir=str(reports), save_dvc_exp=False, dvcyaml=None) as live:

            def on_epoch(epoch: int, stats: dict) -> None:
                for split in ("train", "val"):
                    for name in CURVES:
                        live.log_metric(f"{split}/{name}", round(stats[split][name], 6))
                live.log_metric("lr", stats["lr"])
                live.next_step()
                tr, va = stats["train"], stats["val"]
                typer.echo(
                    f"epoch {epoch:3d}/{train.epochs}: train loss {tr['loss']:.4f} "
                    f"acc {tr['accuracy']:.3f} iou {tr['iou']:.3f} | val box {va['box_loss']:.4f} "
                    f"acc {va['accuracy']:.3f} iou {va['iou']:.3f}"
                )

            result = fit(head, data["train"], data["val"], loss_fn, single_object_batch_sums,
                         config, on_epoch, progress)  # fmt: skip
            best = result.history[result.best_epoch - 1]
            live.summary["best"] = {
                "epoch": result.best_epoch,
                "monitor": round(result.best_monitor, 6),
                **{f"val_{k}": round(v, 6) for k, v in best["val"].items()},
            }
            live.summary["seconds_per_epoch"] = round(result.seconds / train.epochs, 2)
            live.summary["images"] = {split: len(data[split]) for split in data}
        head.load_state_dict(result.best_state)
        info = {
            "kind": "single",
            "classes": prepared.classes,
            "feature_shape": list(feature_shape),
            "backbone": metadata["backbone"],
            "image_mode": mode,
            "image_size": size,
            "head": {
                "hidden": head_params.hidden,
                "dropout": head_params.dropout,
                "classifier": head_params.classifier,
                "classifier_dropout": head_params.classifier_dropout,
            },
            "train": {
                "best_epoch": result.best_epoch,
                "monitor": train.monitor,
                "best_monitor": result.best_monitor,
                "epochs": train.epochs,
            },
        }
        save_checkpoint(MODELS_DIR / "single.safetensors", head, info)
        save_figure(training_curves(result.history, result.best_epoch, "single-object head"),
                    reports / "training_curves.png")  # fmt: skip
        typer.echo(
            f"best epoch {result.best_epoch} ({train.monitor} {result.best_monitor:.4f}); "
            f"{result.seconds / train.epochs:.2f} s/epoch -> {MODELS_DIR / 'single.safetensors'}"
        )


if __name__ == "__main__":
    app()
