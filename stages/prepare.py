"""Stage `prepare`: VOC annotations -> Parquet tables in data/prepared + an exploration report.

    python -m stages.prepare [--params params.yaml]

Reads the synthetic dataset (data.source: synthetic), a VOCdevkit folder (data.source: voc,
optionally downloading VOC2012 first) or a COCO-format folder (data.source: coco, see
pipeline_lib/data/coco.py), then writes
- data/prepared/{images,objects}.parquet and dataset.json (see pipeline_lib/data/tables.py),
- reports/prepare/metrics.json: counts per split (images, objects, difficult, truncated, skipped),
- reports/prepare/objects_per_class.json: one {split, class, objects} row per split and class
  (drawn in figures/class_counts.png),
- reports/prepare/skipped.json: the images dropped under data.on_error: skip, and why,
- reports/prepare/figures/*.png: size histograms, class counts, samples, image modes.
"""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline_lib.base.files import atomic_dir, write_json
from pipeline_lib.base.params import Params, load_params
from pipeline_lib.data.sources import read_source
from pipeline_lib.data.tables import Prepared, read_prepared, split_report, write_prepared
from pipeline_lib.data.voc import DatasetError
from pipeline_lib.reporting import plots
from stages import common
from stages.common import (
    PARAMS_OPTION,
    PREPARE_REPORTS,
    PREPARED_DIR,
    SYNTHETIC_DATASET,
    clean_errors,
)

app = typer.Typer(add_completion=False)


@app.command()
def main(params_file: Path = PARAMS_OPTION) -> None:
    """Parse the annotations of data.train_split and data.val_split into tables and a report."""
    with clean_errors():
        params = load_params(params_file)
        source = read_source(params.data, SYNTHETIC_DATASET)
        rows = source.rows
        for skip in rows.skipped:
            typer.secho(f"warning: skipped {skip['reason']}", err=True, fg=typer.colors.YELLOW)
        if rows.skipped:
            typer.secho(f"warning: skipped {len(rows.skipped)} images", err=True, bold=True)
        if not rows.images:
            splits = source.info["splits"]
            raise DatasetError(f"{source.dataset_dir}: no valid image in the splits {splits}")
        write_prepared(PREPARED_DIR, rows.images, rows.objects, source.info)

    prepared = read_prepared(PREPARED_DIR)
    summary, metrics, per_class = split_report(prepared, list(source.info["splits"]), rows.skipped)
    write_json(PREPARE_REPORTS / "metrics.json", metrics)
    write_json(PREPARE_REPORTS / "objects_per_class.json", per_class)
    write_json(PREPARE_REPORTS / "skipped.json", rows.skipped)
    write_figures(prepared, source.dataset_dir, summary, params)
    for role, stats in summary.items():
        typer.echo(f"{role}: {stats['images']} images, {stats['objects']} objects")


def write_figures(prepared: Prepared, dataset_dir: Path, summary: dict, params: Params) -> None:
    """reports/prepare/figures: class counts, and per split sizes, samples and image modes."""
    images, objects, classes = prepared.images, prepared.objects, prepared.classes
    with atomic_dir(PREPARE_REPORTS / "figures") as out:
        plots.save_figure(plots.class_count_chart(summary, classes), out / "class_counts.png")
        for split in summary:
            mine = images[images["split"] == split]
            if mine.empty:
                continue
            plots.save_figure(plots.size_histograms(mine, split), out / f"sizes_{split}.png")
            wanted = max(params.report.samples, params.report.mode_samples)
            panels = plots.exploration_panels(dataset_dir, plots.pick_evenly(mine, wanted), objects)
            samples = panels[: params.report.samples]
            if samples:
                cols = 4
                grid = [samples[i : i + cols] for i in range(0, len(samples), cols)]
                figure = plots.image_grid(grid, classes, f"{split}: samples")
                plots.save_figure(figure, out / f"samples_{split}.png")
            shown = panels[: params.report.mode_samples]
            if shown:
                rows = plots.mode_rows(shown, params.image.size)
                figure = plots.image_grid(rows, classes, f"{split}: image modes")
                plots.save_figure(figure, out / f"modes_{split}.png")


if __name__ == "__main__":
    common.main(app)
