"""Stage evaluate_single: measure a trained head on the validation features.

    python -m stages.evaluate single [--params params.yaml]

Writes reports/evaluate_single/
- metrics.json (DVC metrics): box_loss (the lab's SmoothL1), accuracy, mean_iou, hit_rate (IoU >=
  eval.iou_threshold and the right class), per_class_accuracy, and the image count,
- confusion.json: one {actual, predicted} row per image (DVC's confusion template),
- figures/confusion.png and figures/predictions.png (eval.samples validation images, the true box
  green and the predicted one red with its score, in the original image's pixels).
"""

from __future__ import annotations

from pathlib import Path

import torch
import typer
from PIL import Image

from pipeline_lib.errors import PipelineError
from pipeline_lib.features import read_features
from pipeline_lib.files import write_json
from pipeline_lib.geometry import encoded_to_image
from pipeline_lib.heads import load_checkpoint
from pipeline_lib.metrics import confusion_matrix, single_object_metrics
from pipeline_lib.params import load_params
from pipeline_lib.plots import (
    Comparison,
    comparison_grid,
    confusion_figure,
    pick_evenly,
    save_figure,
)
from pipeline_lib.tables import read_prepared
from pipeline_lib.targets import single_object_targets
from pipeline_lib.training import predict
from stages.common import (
    FEATURES_DIR,
    MODELS_DIR,
    PARAMS_OPTION,
    PREPARED_DIR,
    REPORTS_DIR,
    clean_errors,
)

app = typer.Typer(add_completion=False, help="Evaluate a trained head on the validation features.")


@app.callback()
def main() -> None:
    """One command per head kind (keeps `single` a subcommand)."""


@app.command()
def single(params_file: Path = PARAMS_OPTION) -> None:
    """Single-object head: accuracy, IoU and the lab's box loss on val."""
    with clean_errors():
        params = load_params(params_file)
        checkpoint = load_checkpoint(MODELS_DIR / "single.safetensors")
        info, classes = checkpoint.info, checkpoint.classes
        prepared = read_prepared(PREPARED_DIR)
        features = read_features(FEATURES_DIR / "val.safetensors")
        if features.metadata["backbone"] != info["backbone"]:
            raise PipelineError(
                f"data/features/val.safetensors comes from {features.metadata['backbone']['name']} "
                f"but {MODELS_DIR / 'single.safetensors'} was trained on "
                f"{info['backbone']['name']}: run dvc repro"
            )
        if prepared.classes != classes:
            raise PipelineError(
                f"data/prepared has classes {prepared.classes} but the model was trained on "
                f"{classes}: run dvc repro"
            )
        mode, size = info["image_mode"], info["image_size"]
        targets = single_object_targets(
            prepared.images, prepared.objects, features.image_ids, mode, size
        )
        keep = targets.present
        if not keep.any():
            raise PipelineError(f"val: none of {len(keep)} images has an object to evaluate on")
        pred_boxes, logits = predict(checkpoint.head, features.features[keep])
        boxes, labels = targets.boxes[keep], targets.labels[keep]
        metrics = single_object_metrics(
            pred_boxes, logits, boxes, labels, classes, params.eval.iou_threshold
        )
        metrics["images_without_object"] = int((~keep).sum())
        out = REPORTS_DIR / "evaluate_single"
        write_json(out / "metrics.json", metrics)
        predicted = logits.argmax(dim=1)
        write_json(
            out / "confusion.json",
            [
                {"actual": classes[a], "predicted": classes[p]}
                for a, p in zip(labels.tolist(), predicted.tolist(), strict=True)
            ],  # fmt: skip
        )
        matrix = confusion_matrix(labels, predicted, len(classes))
        save_figure(confusion_figure(matrix, classes, "Single-object head on val"),
                    out / "figures" / "confusion.png")  # fmt: skip

        ids = [i for i, k in zip(features.image_ids, keep.tolist(), strict=True) if k]
        rows = prepared.images.set_index("image_id").loc[ids].reset_index()
        rows["row"] = range(len(rows))
        dataset_dir = Path(prepared.info["dataset_dir"])
        scores = torch.softmax(logits, dim=1).max(dim=1).values
        items = []
        for row in pick_evenly(rows, params.eval.samples).itertuples():
            r, shape = row.row, (row.width, row.height, mode, size)
            with Image.open(dataset_dir / row.path) as image:
                rgb = image.convert("RGB")
            items.append(Comparison(
                rgb, encoded_to_image(boxes[r : r + 1], *shape), [classes[labels[r]]],
                encoded_to_image(pred_boxes[r : r + 1], *shape),
                [f"{classes[predicted[r]]} {scores[r]:.2f}"], row.image_id,
            ))  # fmt: skip
        save_figure(comparison_grid(items, title="Single-object head on val"),
                    out / "figures" / "predictions.png", dpi=64)  # fmt: skip
        typer.echo(
            f"val: {metrics['images']} images, accuracy {metrics['accuracy']:.3f}, mean IoU "
            f"{metrics['mean_iou']:.3f}, hit rate {metrics['hit_rate']:.3f}, box loss "
            f"{metrics['box_loss']:.4f} -> {out / 'metrics.json'}"
        )


if __name__ == "__main__":
    app()
