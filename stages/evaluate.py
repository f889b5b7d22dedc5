"""Stages evaluate_single and evaluate_multi: measure a trained head on the validation features.

    python -m stages.evaluate single [--params params.yaml]
    python -m stages.evaluate multi  [--params params.yaml]

evaluate_multi writes reports/evaluate_multi/
- metrics.json (DVC metrics): PASCAL VOC mAP at eval.iou_threshold (all-point, "map", and 11-point,
  "map_11point"; difficult objects ignored; box overlap as the devkit measures it on VOC's
  inclusive pixels, or continuous for COCO-format data: "overlap"), per-class AP (both), COCO
  mAP@[.5:.95] from torchmetrics, VOC mAP at IoU 0.3 and 0.1 (diagnostics), the recall upper
  bound left by grid collisions (and by crop), detections per image, evaluation seconds,
- pr_curves.json (DVC plot, x = recall, y = precision, one curve per class) and per_class_ap.json
  (DVC plot: a bar per class),
- figures/pr_curves.png, figures/per_class_ap.png, figures/nms_before_after.png (eval.samples val
  images, detections scoring eval.draw_score or more before and after NMS, the truth dashed).
Detections are compared with every object of the original images (in their pixels).

evaluate_single writes reports/evaluate_single/
- metrics.json (DVC metrics): box_loss (the lab's SmoothL1), accuracy, mean_iou, hit_rate (IoU >=
  eval.iou_threshold and the right class), per_class_accuracy, and the image count,
- confusion.json: one {actual, predicted} row per image (DVC's confusion template),
- figures/confusion.png and figures/predictions.png (eval.samples validation images, the true box
  green and the predicted one red with its score, in the original image's pixels).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import typer
from PIL import Image

from pipeline_lib.detection import grid_detections
from pipeline_lib.errors import PipelineError
from pipeline_lib.features import Features, read_features
from pipeline_lib.files import write_json
from pipeline_lib.geometry import encoded_to_image
from pipeline_lib.heads import Checkpoint, load_checkpoint
from pipeline_lib.metrics import (
    OVERLAP_OF_SOURCE,
    coco_map,
    confusion_matrix,
    mean_ap,
    single_object_metrics,
    voc_average_precision,
)
from pipeline_lib.params import load_params
from pipeline_lib.plots import (
    Comparison,
    ap_chart,
    comparison_grid,
    confusion_figure,
    nms_grid,
    pick_evenly,
    pr_curves,
    save_figure,
)
from pipeline_lib.tables import Prepared, read_prepared
from pipeline_lib.targets import (
    grid_levels,
    ground_truth,
    multi_object_targets,
    single_object_targets,
)
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
        checkpoint, prepared, features = load_inputs("single")
        info, classes = checkpoint.info, checkpoint.classes
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


@app.command()
def multi(params_file: Path = PARAMS_OPTION) -> None:
    """Grid head: PASCAL VOC mAP (all-point and 11-point), COCO mAP, PR curves on val."""
    with clean_errors():
        ev = load_params(params_file).eval
        checkpoint, prepared, features = load_inputs("multi")
        info, classes = checkpoint.info, checkpoint.classes
        mode, size, cells = info["image_mode"], info["image_size"], info["num_cells"]
        start = time.perf_counter()
        outputs = predict(checkpoint.head, features.features)
        pred_boxes, logits = outputs[0::2], outputs[1::2]  # per level (two-level head: two)
        sizes = prepared.images.set_index("image_id").loc[features.image_ids]
        image_sizes = [
            (int(w), int(h)) for w, h in zip(sizes["width"], sizes["height"], strict=True)
        ]
        detections = grid_detections(pred_boxes, logits, image_sizes, mode, size,
                                     ev.score_threshold, ev.nms_iou, ev.max_detections)  # fmt: skip
        truth = ground_truth(prepared.objects, features.image_ids)
        found = [(d.boxes, d.scores, d.labels) for d in detections]
        overlap = OVERLAP_OF_SOURCE[prepared.info["source"]]
        per_class = voc_average_precision(found, truth, len(classes), ev.iou_threshold, overlap)
        head = checkpoint.head
        anchors = head.anchors if getattr(head, "n_anchors", 0) else None
        learnable = 0
        for n, scales in grid_levels(cells, info.get("fine_below")):
            grid = multi_object_targets(prepared.images, prepared.objects, features.image_ids,
                                        mode, size, n, anchors, scales)  # fmt: skip
            learnable += int(grid.objects.sum() - grid.dropped.sum())
        n_objects = sum(len(t[1]) for t in truth)
        metrics = {
            "images": len(truth),
            "objects": n_objects,
            "map": round(mean_ap(per_class), 4),
            "map_11point": round(mean_ap(per_class, eleven_point=True), 4),
            "iou_threshold": ev.iou_threshold,
            "overlap": overlap,
            "coco_map": round(coco_map(found, truth), 4),
            **{f"map_iou_{t}": round(mean_ap(voc_average_precision(found, truth, len(classes), t,
                                                                   overlap)), 4)
               for t in (0.3, 0.1)},
            # objects the grid can learn: not cut away by crop, not lost in a cell (and anchor)
            # collision
            "recall_upper_bound": round(learnable / max(n_objects, 1), 4),
            "detections_per_image": round(sum(len(d) for d in detections) / len(truth), 3),
            "per_class_ap": {n: _round(c.ap) for n, c in zip(classes, per_class, strict=True)},
            "per_class_ap_11point": {n: _round(c.ap11) for n, c in zip(classes, per_class,
                                                                          strict=True)},
            "seconds": round(time.perf_counter() - start, 2),
        }  # fmt: skip
        out = REPORTS_DIR / "evaluate_multi"
        write_json(out / "metrics.json", metrics)
        write_json(out / "pr_curves.json", [
            {"class": name, "recall": round(r, 5), "precision": round(p, 5)}
            for name, c in zip(classes, per_class, strict=True)
            for r, p in zip(c.recall, c.precision, strict=True)
        ])  # fmt: skip
        write_json(out / "per_class_ap.json", [
            {"class": name, "ap": c.ap} for name, c in zip(classes, per_class, strict=True)
            if c.ap is not None
        ])  # fmt: skip
        curves = {n: (c.recall, c.precision, c.ap) for n, c in zip(classes, per_class, strict=True)}
        save_figure(pr_curves(curves), out / "figures" / "pr_curves.png")
        save_figure(ap_chart(metrics["per_class_ap"], f"AP@{ev.iou_threshold} per class (val)"),
                    out / "figures" / "per_class_ap.png")  # fmt: skip
        rows = sizes.reset_index()
        rows["row"] = range(len(rows))
        dataset_dir = Path(prepared.info["dataset_dir"])
        pairs = []
        for row in pick_evenly(rows, ev.samples).itertuples():
            n = row.row
            with Image.open(dataset_dir / row.path) as image:
                rgb = image.convert("RGB")
            gt_boxes, gt_labels, _ = truth[n]
            texts = [classes[k] for k in gt_labels.tolist()]
            pair = []
            for nms, label in ((None, "before NMS"), (ev.nms_iou, "after NMS")):
                (d,) = grid_detections([b[n : n + 1] for b in pred_boxes],
                                       [k[n : n + 1] for k in logits], [image_sizes[n]], mode,
                                       size, ev.draw_score, nms, ev.max_detections)  # fmt: skip
                pairs_ks = zip(d.labels.tolist(), d.scores.tolist(), strict=True)
                found_texts = [f"{classes[k]} {s:.2f}" for k, s in pairs_ks]
                pair.append(Comparison(rgb, gt_boxes, texts, d.boxes, found_texts,
                                       f"{row.image_id}: {len(d)} {label}"))  # fmt: skip
            pairs.append(tuple(pair))
        save_figure(nms_grid(pairs), out / "figures" / "nms_before_after.png", dpi=56)
        typer.echo(
            f"val: {metrics['images']} images, mAP@{ev.iou_threshold} {metrics['map']:.3f} "
            f"(11-point {metrics['map_11point']:.3f}), COCO mAP {metrics['coco_map']:.3f}, "
            f"recall upper bound {metrics['recall_upper_bound']:.3f}, "
            f"{metrics['detections_per_image']:.1f} detections/image -> {out / 'metrics.json'}"
        )


def load_inputs(kind: str) -> tuple[Checkpoint, Prepared, Features]:
    """The trained head of `kind`, the prepared tables and the val features, checked to match."""
    path = MODELS_DIR / f"{kind}.safetensors"
    checkpoint = load_checkpoint(path)
    info = checkpoint.info
    prepared = read_prepared(PREPARED_DIR)
    features = read_features(FEATURES_DIR / "val.safetensors")
    if features.metadata["backbone"] != info["backbone"]:
        raise PipelineError(
            f"data/features/val.safetensors comes from {features.metadata['backbone']['name']} "
            f"but {path} was trained on {info['backbone']['name']}: run dvc repro"
        )
    if prepared.classes != checkpoint.classes:
        raise PipelineError(
            f"data/prepared has classes {prepared.classes} but {path} was trained on "
            f"{checkpoint.classes}: run dvc repro"
        )
    return checkpoint, prepared, features


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


if __name__ == "__main__":
    app()
