"""Evaluation reports: a trained head measured on the validation images, as the evaluate stages
write them (metrics, plot tables, figures).

- `read_evaluation_inputs`: the model, the prepared tables and the val features, checked to match.
- `single_report`: accuracy, IoU and the lab's box loss of the single-object head, its confusion
  rows and a figure of predictions.
- `grid_report`: PASCAL VOC mAP (all-point and 11-point), COCO mAP, diagnostics, PR curves and AP
  by object size of the grid head, its errors split as TIDE does and its confusion with the
  background, and a figure of detections before and after NMS.
Both keep per-image records (records.py) and give their headline figures a bootstrap interval.
Detections are compared with every object of the original images, in their pixels.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from matplotlib.figure import Figure
from PIL import Image

from pipeline_lib.base.errors import PipelineError
from pipeline_lib.base.params import EvalParams, by_name
from pipeline_lib.boxes.detection import Filtering
from pipeline_lib.boxes.geometry import encoded_to_image
from pipeline_lib.data.tables import Prepared, read_prepared
from pipeline_lib.features.featurefiles import Features, read_features
from pipeline_lib.measures.bootstrap import image_weights, interval
from pipeline_lib.measures.errortypes import BACKGROUND_IOU, ErrorSplit, split_errors
from pipeline_lib.measures.metrics import (
    OVERLAP_OF_SOURCE,
    ClassAP,
    Truth,
    VocSummary,
    ap_by_size,
    confusion_matrix,
    detection_confusion,
    encoded_iou,
    precision_envelope,
    round_ap,
    single_object_metrics,
    voc_summary,
)
from pipeline_lib.measures.records import BOX, Judging, Records, SingleRecords, multi_records
from pipeline_lib.models.checkpoints import Checkpoint, check_classes, load_checkpoint
from pipeline_lib.models.targets import (
    ground_truth,
    single_object_targets,
)
from pipeline_lib.reporting.plots import (
    Comparison,
    ap_chart,
    comparison_grid,
    confusion_figure,
    error_chart,
    nms_grid,
    pick_evenly,
    pr_curves,
)
from pipeline_lib.training.loop import predict


@dataclass
class EvaluationInputs:
    checkpoint: Checkpoint
    prepared: Prepared
    features: Features  # val

    def image_rows(self) -> pd.DataFrame:
        """The prepared rows of the val images, in feature-row order."""
        return self.prepared.images.set_index("image_id").loc[self.features.image_ids].reset_index()

    def image_sizes(self) -> list[tuple[int, int]]:
        """(width, height) of each val image, in feature-row order."""
        rows = self.image_rows()
        return [(int(w), int(h)) for w, h in zip(rows["width"], rows["height"], strict=True)]


def read_evaluation_inputs(model: Path, prepared_dir: Path, features: Path) -> EvaluationInputs:
    """The model in `model`, the prepared tables and the val features, checked to match."""
    checkpoint = load_checkpoint(model)
    prepared = read_prepared(prepared_dir)
    val = read_features(features)
    backbone = checkpoint.card.backbone
    if val.metadata["backbone"] != backbone:
        raise PipelineError(
            f"{features} comes from {val.metadata['backbone']['name']} "
            f"but {model} was trained on {backbone['name']}: run dvc repro"
        )
    check_classes(prepared, checkpoint, model)
    return EvaluationInputs(checkpoint, prepared, val)


@dataclass
class Report:
    """What an evaluate stage writes: metrics.json, the other metrics files (name -> content),
    plot tables (name -> rows), figures and the per-image records."""

    metrics: dict
    tables: dict[str, list[dict]]
    figures: dict[str, Figure]  # file name -> figure
    summary: str  # one line for the user
    more_metrics: dict[str, dict] = field(default_factory=dict)  # intervals.json, errors.json
    records: Records | None = None


# The draws of the val images start from this seed: the same records give the same intervals.
BOOTSTRAP_SEED = 0


def intervals(records: Records, ev: EvalParams) -> dict:
    """intervals.json: for each headline figure of `records`, the bootstrap interval (ev.bootstrap
    draws of the val images, ev.confidence) as {"low", "high"}, rounded to 4 digits."""
    weights = image_weights(len(records.images), ev.bootstrap, BOOTSTRAP_SEED)
    found = {}
    for name, draws in records.figure_draws(weights).items():
        low, high = interval(draws, ev.confidence)
        found[name] = {"low": round(low, 4), "high": round(high, 4)}
    return found | {"draws": ev.bootstrap, "confidence": ev.confidence, "seed": BOOTSTRAP_SEED}


def with_interval(value: float, bounds: dict, confidence: float) -> str:
    """'0.288 (95 % 0.250-0.330)': a figure and its interval, for the stage's line."""
    return f"{value:.3f} ({confidence:.0%} {bounds['low']:.3f}-{bounds['high']:.3f})".replace(
        "%", " %"
    )


def single_report(inputs: EvaluationInputs, ev: EvalParams) -> Report:
    """The single-object head on val: metrics, confusion rows, figures, records and intervals."""
    checkpoint, prepared, features = inputs.checkpoint, inputs.prepared, inputs.features
    classes, spec = checkpoint.classes, checkpoint.card.image
    targets = single_object_targets(prepared.images, prepared.objects, features.image_ids, spec)
    keep = targets.present
    if not keep.any():
        raise PipelineError(f"val: none of {len(keep)} images has an object to evaluate on")
    pred_boxes, logits = predict(checkpoint.head, features.features[keep])
    boxes, labels = targets.boxes[keep], targets.labels[keep]
    metrics = single_object_metrics(pred_boxes, logits, boxes, labels, classes, ev.iou_threshold)
    metrics["images_without_object"] = int((~keep).sum())
    per_class = metrics.pop("per_class_accuracy")  # a plot, not a dozen DVC metrics
    accuracy_rows = [
        {"class": name, "accuracy": v} for name, v in per_class.items() if v is not None
    ]
    predicted = logits.argmax(dim=1)
    pairs = zip(labels.tolist(), predicted.tolist(), strict=True)
    confusion = [{"actual": classes[a], "predicted": classes[p]} for a, p in pairs]
    matrix = confusion_matrix(labels, predicted, len(classes))
    title = "Single-object head on val"
    rows = inputs.image_rows()[keep.numpy()].reset_index(drop=True)
    scores = torch.softmax(logits, dim=1).max(dim=1).values
    truth, found = [], []
    for r, row in enumerate(rows.itertuples()):
        shape = (row.width, row.height, spec.mode, spec.size)
        truth.append(encoded_to_image(boxes[r : r + 1], *shape))
        found.append(encoded_to_image(pred_boxes[r : r + 1], *shape))
    records = SingleRecords(
        classes,
        Judging(ev.iou_threshold, OVERLAP_OF_SOURCE[prepared.info["source"]], ev.draw_score),
        str(prepared.info["dataset_dir"]),
        single_rows(rows, labels, predicted, scores, encoded_iou(pred_boxes, boxes), truth, found),
    )
    rows["row"] = range(len(rows))
    items = []
    for row in pick_evenly(rows, ev.samples).itertuples():
        r = row.row
        text = f"{classes[predicted[r]]} {scores[r]:.2f}"
        image = _open(prepared, row.path)
        items.append(
            Comparison(image, truth[r], [classes[labels[r]]], found[r], [text], row.image_id)
        )
    figures = {
        "confusion.png": confusion_figure(matrix, classes, title),
        "predictions.png": comparison_grid(items, title=title),
    }
    m, bounds = metrics, intervals(records, ev)
    summary = (
        f"val: {m['images']} images, accuracy "
        f"{with_interval(m['accuracy'], bounds['accuracy'], ev.confidence)}, mean IoU "
        f"{with_interval(m['mean_iou'], bounds['mean_iou'], ev.confidence)}, "
        f"hit rate {m['hit_rate']:.3f}, box loss {m['box_loss']:.4f}"
    )
    tables = {"confusion.json": confusion, "per_class_accuracy.json": accuracy_rows}
    return Report(metrics, tables, figures, summary, {"intervals.json": bounds}, records)


def single_rows(
    rows: pd.DataFrame,
    labels: torch.Tensor,
    predicted: torch.Tensor,
    scores: torch.Tensor,
    iou: torch.Tensor,
    truth: list[torch.Tensor],
    found: list[torch.Tensor],
) -> pd.DataFrame:
    """records.SingleRecords' table: the val images' prepared `rows` with the largest object's
    label, the predicted class, its score, the IoU and both boxes ((1, 4) xyxy pixels each)."""
    frame = rows[["image_id", "path", "width", "height"]].copy()
    frame["label"], frame["predicted"] = labels.numpy(), predicted.numpy()
    frame["score"], frame["iou"] = scores.float().numpy(), iou.double().numpy()
    for prefix, boxes in (("true", truth), ("pred", found)):
        values = torch.cat(boxes).double().reshape(-1, 4).numpy()
        for k, corner in enumerate(BOX):
            frame[f"{prefix}_{corner}"] = values[:, k]
    return frame


def _open(prepared: Prepared, path: str) -> Image.Image:
    with Image.open(Path(prepared.info["dataset_dir"]) / path) as image:
        return image.convert("RGB")


def recall_upper_bound(inputs: EvaluationInputs, n_objects: int) -> float:
    """Share of the val objects the head can learn (its `learnable_objects`: not cut away by
    crop, not lost in a cell and anchor collision, or for FCOS, given a location)."""
    checkpoint = inputs.checkpoint
    ids = inputs.features.image_ids
    learnable = checkpoint.head.learnable_objects(checkpoint.card, inputs.prepared, ids)
    return learnable / max(n_objects, 1)


def grid_report(inputs: EvaluationInputs, ev: EvalParams) -> Report:
    """The grid head on val: VOC and COCO mAP, diagnostics, PR curves, the error split, the
    confusion with the background, figures, records and intervals."""
    start = time.perf_counter()
    card, classes = inputs.checkpoint.card, inputs.checkpoint.classes
    head = inputs.checkpoint.head
    outputs = predict(head, inputs.features.features)
    sizes = inputs.image_sizes()
    keep = by_name(Filtering, ev)
    found = head.detections(outputs, sizes, card.image, keep)
    truth = ground_truth(inputs.prepared.objects, inputs.features.image_ids)
    overlap = OVERLAP_OF_SOURCE[inputs.prepared.info["source"]]
    voc = voc_summary(found, truth, classes, ev.iou_threshold, overlap)
    n_objects = sum(len(t[1]) for t in truth)
    detections = [d.as_tuple() for d in found]
    metrics = {
        "images": len(truth),
        "objects": n_objects,
        "map": round(voc.map(), 4),
        "map_11point": round(voc.map(eleven_point=True), 4),
        "iou_threshold": ev.iou_threshold,
        "overlap": overlap,
    }
    judging = Judging(ev.iou_threshold, overlap, ev.draw_score)
    dataset_dir = str(inputs.prepared.info["dataset_dir"])
    records = multi_records(inputs.image_rows(), detections, truth, classes, judging, dataset_dir)
    own = records.figure_draws(torch.ones(1, len(truth), dtype=torch.float64))
    metrics["coco_map"] = round(float(own["coco_map"][0]), 4)
    for iou in (0.3, 0.1):
        metrics[f"map_iou_{iou}"] = round(voc_summary(found, truth, classes, iou, overlap).map(), 4)
    metrics |= {
        "recall_upper_bound": round(recall_upper_bound(inputs, n_objects), 4),
        "detections_per_image": round(sum(len(d) for d in found) / len(truth), 3),
    }
    bounds = intervals(records, ev)
    split = split_errors(
        detections, truth, len(classes), overlap=overlap, foreground=ev.iou_threshold
    )
    drawn = [tuple(t[d[1] >= ev.draw_score] for t in d) for d in detections]
    confusion = detection_confusion(drawn, truth, len(classes), ev.iou_threshold, overlap)
    metrics["seconds"] = round(time.perf_counter() - start, 2)
    sized = ap_by_size(detections, truth, len(classes), ev.iou_threshold, overlap)
    by_size = {name: VocSummary(classes, per_class) for name, per_class in sized.items()}
    tables, figures = grid_plots(voc, by_size, split, confusion, ev)
    figures["nms_before_after.png"] = nms_grid(nms_pairs(inputs, outputs, truth, ev, sizes))
    errors = {
        "map_gain": {kind: round(gain, 4) for kind, gain in split.gains.items()},
        "errors": split.counts,
        "foreground_iou": ev.iou_threshold,
        "background_iou": BACKGROUND_IOU,
    }
    m = metrics
    summary = (
        f"val: {m['images']} images, mAP@{ev.iou_threshold} "
        f"{with_interval(m['map'], bounds['map'], ev.confidence)} (11-point "
        f"{m['map_11point']:.3f}), COCO mAP "
        f"{with_interval(m['coco_map'], bounds['coco_map'], ev.confidence)}, recall upper bound "
        f"{m['recall_upper_bound']:.3f}, {m['detections_per_image']:.1f} detections/image"
    )
    more = {"intervals.json": bounds, "errors.json": errors}
    return Report(metrics, tables, figures, summary, more, records)


BACKGROUND = "background"  # the confusion matrix's extra class: no object, or no detection


def grid_plots(
    voc: VocSummary,
    by_size: dict[str, VocSummary],
    split: ErrorSplit,
    confusion: torch.Tensor,
    ev: EvalParams,
) -> tuple[dict, dict]:
    """The grid report's plot tables and figures but the NMS one: PR curves, AP per class and by
    object size, the error split, the confusion of the detections with the background."""
    classes, names = voc.classes, [*voc.classes, BACKGROUND]
    tables = {
        "pr_curves.json": pr_rows(voc),
        "per_class_ap.json": ap_rows(voc, by_size),
        "ap_by_size.json": size_rows(by_size),
        "error_types.json": [
            {"type": kind, "map_gain": round(gain, 4), "errors": split.counts[kind]}
            for kind, gain in split.gains.items()
        ],
        "detection_confusion.json": confusion_rows(confusion, names),
    }
    curves = {n: (*pr_steps(c), c.ap) for n, c in zip(classes, voc.per_class, strict=True)}
    size_aps = {f"{r['size']} ({r['objects']} objects)": r["map"] for r in size_rows(by_size)}
    errors_title = f"mAP@{ev.iou_threshold} gained by fixing each error type alone (val)"
    confusion_title = f"Detections from score {ev.draw_score} at IoU {ev.iou_threshold} (val)"
    figures = {
        "pr_curves.png": pr_curves(curves),
        "per_class_ap.png": ap_chart(voc.per_class_ap(), f"AP@{ev.iou_threshold} per class (val)"),
        "ap_by_size.png": ap_chart(size_aps, f"mAP@{ev.iou_threshold} by object size (val)"),
        "error_types.png": error_chart(split.gains, split.counts, errors_title),
        "detection_confusion.png": confusion_figure(confusion, names, confusion_title),
    }
    return tables, figures


def confusion_rows(matrix: torch.Tensor, names: list[str]) -> list[dict]:
    """DVC plot rows of a confusion matrix: one {actual, predicted} row per count."""
    return [
        {"actual": names[a], "predicted": names[p]}
        for (a, p), count in zip(
            torch.cartesian_prod(torch.arange(len(names)), torch.arange(len(names))).tolist(),
            matrix.flatten().tolist(),
            strict=True,
        )
        for _ in range(count)
    ]


def pr_steps(c: ClassAP) -> tuple[list[float], list[float]]:
    """The precision-recall curve that AP measures, as (recall, precision) corners of a step
    line drawn "step-before" (vertical first): precision is the envelope (the best at that recall
    or beyond), a point per change of it, starting at recall 0. Its area is the all-point AP; no
    spike at recall 0 from a first false positive."""
    if not c.precision:
        return [], []
    envelope = precision_envelope(torch.tensor(c.precision, dtype=torch.float64)).tolist()
    last = [
        i for i in range(len(envelope)) if i + 1 == len(envelope) or envelope[i + 1] != envelope[i]
    ]
    return [0.0] + [c.recall[i] for i in last], [envelope[0]] + [envelope[i] for i in last]


def pr_rows(voc: VocSummary) -> list[dict]:
    """DVC plot rows: (class, recall, precision) at the corners of each class's `pr_steps`."""
    return [
        {"class": name, "recall": round(r, 5), "precision": round(p, 5)}
        for name, c in zip(voc.classes, voc.per_class, strict=True)
        for r, p in zip(*pr_steps(c), strict=True)
    ]


def ap_rows(voc: VocSummary, by_size: dict[str, VocSummary]) -> list[dict]:
    """DVC plot rows: one per class that has objects, (class, ap, ap_11point) and its AP on the
    objects of each size (`ap_small`, ...: null where the class has none of that size)."""
    rows = []
    for k, (name, c) in enumerate(zip(voc.classes, voc.per_class, strict=True)):
        if c.ap is not None:
            row = {"class": name, "ap": round(c.ap, 4), "ap_11point": round(c.ap11, 4)}
            rows.append(row | {f"ap_{s}": round_ap(v.per_class[k].ap) for s, v in by_size.items()})
    return rows


def size_rows(by_size: dict[str, VocSummary]) -> list[dict]:
    """DVC plot rows: per object size (metrics.SIZE_RANGES), its mAP (over the classes with
    objects of that size) and how many objects (not difficult) it has."""
    return [
        {
            "size": name,
            "map": round(summary.map(), 4),
            "objects": sum(c.positives for c in summary.per_class),
        }
        for name, summary in by_size.items()
    ]


def nms_pairs(
    inputs: EvaluationInputs, outputs: tuple, truth: Truth, ev: EvalParams, sizes: list
) -> list[tuple[Comparison, Comparison]]:
    """ev.samples val images, each with its detections scoring ev.draw_score or more, before and
    after NMS; `outputs`: the head's outputs on all val images, `sizes` their (width, height)."""
    head = inputs.checkpoint.head
    classes, spec = inputs.checkpoint.classes, inputs.checkpoint.card.image
    rows = inputs.prepared.images.set_index("image_id").loc[inputs.features.image_ids]
    rows = rows.reset_index()
    rows["row"] = range(len(rows))
    pairs = []
    for row in pick_evenly(rows, ev.samples).itertuples():
        n = row.row
        image = _open(inputs.prepared, row.path)
        gt_boxes, gt_labels, _ = truth[n]
        texts = [classes[k] for k in gt_labels.tolist()]
        pair = []
        for nms, label in ((None, "before NMS"), (ev.nms_iou, "after NMS")):
            keep = by_name(Filtering, ev, score_threshold=ev.draw_score, nms_iou=nms)
            mine = [t[n : n + 1] for t in outputs]
            (d,) = head.detections(mine, [sizes[n]], spec, keep)
            scored = zip(d.labels.tolist(), d.scores.tolist(), strict=True)
            found = [f"{classes[k]} {s:.2f}" for k, s in scored]
            title = f"{row.image_id}: {len(d)} {label}"
            pair.append(Comparison(image, gt_boxes, texts, d.boxes, found, title))
        pairs.append(tuple(pair))
    return pairs
