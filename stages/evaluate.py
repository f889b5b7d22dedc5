"""Stages evaluate_single and evaluate_multi: measure a trained head on the validation features.

    python -m stages.evaluate single [--params params.yaml]
    python -m stages.evaluate multi  [--params params.yaml]

evaluate_multi writes reports/evaluate_multi/
- metrics.json (DVC metrics): PASCAL VOC mAP at eval.iou_threshold (all-point, "map", and 11-point,
  "map_11point"; difficult objects ignored; box overlap as the devkit measures it on VOC's
  inclusive pixels, or continuous for COCO-format data: "overlap"), COCO mAP@[.5:.95] as
  pycocotools computes it, VOC mAP at IoU 0.3 and 0.1 (diagnostics), the recall upper bound left
  by grid collisions (and by crop), detections per image, evaluation seconds,
- pr_curves.json (DVC plot, x = recall, y = precision, one curve per class: the interpolated
  precision that AP integrates), per_class_ap.json (DVC plot: a bar per class; both APs, and the
  AP on the small, medium and large objects: ap_small, ...) and ap_by_size.json (DVC plot: mAP
  and object count per size, COCO's areas in the original pixels),
- errors.json (DVC metrics): the errors split as TIDE does (classification, localisation, both,
  duplicate, background, missed): the mAP each type would give back if fixed alone ("map_gain")
  and how many there are ("errors"); error_types.json (DVC plot: a bar per type),
- detection_confusion.json (DVC plot: classes and the background, detections scoring
  eval.draw_score or more against the objects at eval.iou_threshold),
- figures/pr_curves.png, figures/per_class_ap.png, figures/ap_by_size.png,
  figures/error_types.png, figures/detection_confusion.png, figures/nms_before_after.png
  (eval.samples val images, detections scoring eval.draw_score or more before and after NMS, the
  truth dashed).
Detections are compared with every object of the original images (in their pixels).

Both stages also write
- intervals.json (DVC metrics): the eval.confidence (95 %) bootstrap interval of each headline
  figure (map and coco_map; accuracy and mean_iou) over eval.bootstrap draws of the val images,
- records/ (a cached DVC output): the per-image records (pipeline_lib/measures/records.py)
  that the review (stages/report.py) resamples and compares.

evaluate_single writes reports/evaluate_single/
- metrics.json (DVC metrics): box_loss (the lab's SmoothL1), accuracy, mean_iou, hit_rate (IoU >=
  eval.iou_threshold and the right class), and the image count,
- confusion.json: one {actual, predicted} row per image (DVC plot, counts written in the cells),
- per_class_accuracy.json: accuracy over the images whose largest object is of each class (DVC
  plot: a bar per class),
- figures/confusion.png and figures/predictions.png (eval.samples validation images, the true box
  green and the predicted one red with its score, in the original image's pixels).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import typer

from pipeline_lib.base.files import write_json
from pipeline_lib.base.params import EvalParams, load_params
from pipeline_lib.evaluation.evaluate import (
    EvaluationInputs,
    Report,
    grid_report,
    read_evaluation_inputs,
    single_report,
)
from pipeline_lib.measures.records import write_records
from pipeline_lib.reporting.plots import save_figure
from stages import common

app = common.command_group("Evaluate a trained head on the validation features.")


@app.command()
def single(params_file: Path = common.PARAMS_OPTION) -> None:
    """Single-object head: accuracy, IoU and the lab's box loss on val."""
    evaluate("single", single_report, params_file)


@app.command()
def multi(params_file: Path = common.PARAMS_OPTION) -> None:
    """Grid head: PASCAL VOC mAP (all-point and 11-point), COCO mAP, PR curves on val."""
    evaluate("multi", grid_report, params_file)


def evaluate(
    kind: str, make_report: Callable[[EvaluationInputs, EvalParams], Report], params_file: Path
) -> None:
    """Measure models/KIND.safetensors on the val features; write reports/evaluate_KIND/."""
    with common.clean_errors():
        ev = load_params(params_file).eval
        model = common.MODELS_DIR / f"{kind}.safetensors"
        inputs = read_evaluation_inputs(model, common.PREPARED_DIR, common.VAL_FEATURES)
        report = make_report(inputs, ev)
        out = common.REPORTS_DIR / f"evaluate_{kind}"
        write_records(report.records, out / "records")
        write_json(out / "metrics.json", report.metrics)
        for name, content in report.more_metrics.items():
            write_json(out / name, content)
        for name, rows in report.tables.items():
            write_json(out / name, rows)
        for name, figure in report.figures.items():
            save_figure(figure, out / "figures" / name)
        typer.echo(f"{report.summary} -> {out / 'metrics.json'}")


if __name__ == "__main__":
    common.main(app)
