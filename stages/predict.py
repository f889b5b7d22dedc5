"""Run a trained model on your own images (not a DVC stage: a tool for after training).

    python -m stages.predict photo.jpg holidays/ [--model models/multi.safetensors]
        [--out predictions] [--score 0.2] [--nms-iou 0.5] [--format parquet|json] [--show-grid]
        [--batch-size 16] [--device auto]

Needs only the model file: it names its backbone, image mode and size, feature dtype and classes.
Writes into --out
- <image name>.png per image: the photo at full size with its detections (class colour, name,
  score); --show-grid also draws the grid head's S x S cells,
- detections.parquet (or detections.json): one row per detection with image (the path as given),
  class, score, xmin, ymin, xmax, ymax in the original image's pixels.
A file that cannot be read gets one error line and the others are still processed; the exit code is
1 if anything failed.
"""

from __future__ import annotations

import sys
import time
import warnings
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import pandas as pd
import typer
from tqdm import tqdm

from pipeline_lib.base.files import atomic_file, write_json
from pipeline_lib.boxes.detection import Filtering
from pipeline_lib.evaluation.inference import (
    TABLE_COLUMNS,
    Detector,
    collect_images,
    detect,
    draw,
    load_detector,
    read_photo,
    table_rows,
    unique_name,
)
from pipeline_lib.features.images import ImageError
from stages import common
from stages.common import MODELS_DIR, clean_errors

DEFAULT_MODEL = MODELS_DIR / "multi.safetensors"
DEFAULT_OUT = Path("predictions")
Score = Annotated[float, typer.Option(min=0.0, max=1.0, help="Grid head: lowest score kept.")]
NmsIou = Annotated[float, typer.Option(min=0.0, max=1.0, help="Grid head: NMS IoU.")]
MaxDetections = Annotated[int, typer.Option(min=1, help="Grid head: most boxes per image.")]
Device = Annotated[str, typer.Option(help="auto (GPU if there is one) | cpu | cuda.")]


class Format(StrEnum):
    parquet = "parquet"
    json = "json"


@dataclass
class Output:
    folder: Path
    show_grid: bool
    batch_size: int
    progress: bool


app = typer.Typer(add_completion=False)


@app.command()
def main(
    images: Annotated[list[Path], typer.Argument(help="Image files and/or folders of images.")],
    model: Annotated[Path, typer.Option(help="A trained model file.")] = DEFAULT_MODEL,
    out: Annotated[Path, typer.Option(help="Folder for the PNGs and the table.")] = DEFAULT_OUT,
    score: Score = Filtering.score_threshold,  # the library's defaults, one owner
    nms_iou: NmsIou = Filtering.nms_iou,
    max_detections: MaxDetections = Filtering.max_detections,
    format: Annotated[
        Format, typer.Option(help="Format of the detections table.")
    ] = Format.parquet,
    show_grid: Annotated[bool, typer.Option(help="Draw the grid head's cells.")] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per backbone call.")] = 16,
    device: Device = "auto",
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Detect objects in IMAGES with a trained model; annotated PNGs and a detections table."""
    inputs = collect_images(images)
    paths, failures = inputs.paths, inputs.problems
    for failure in failures:
        typer.secho(f"error: {failure}", err=True, fg=typer.colors.RED)
    for skipped in inputs.skipped:
        typer.echo(f"skipped {skipped}", err=True)
    if not paths:
        raise typer.Exit(1)
    with clean_errors():
        detector = load_detector(model, device)
    keep = Filtering(score, nms_iou, max_detections)
    output = Output(out, show_grid and detector.card.kind == "multi", batch_size, progress)
    start = time.perf_counter()
    rows, done = predict_all(detector, paths, keep, output, failures)
    rate = done / max(time.perf_counter() - start, 1e-9)
    table = write_table(rows, out / f"detections.{Format(format).value}")
    typer.echo(
        f"{done} image{'' if done == 1 else 's'}, {len(rows)} detections, {rate:.1f} images/s "
        f"on {detector.device.type} -> {out}/ ({table.name} and one PNG per image)"
    )
    if failures:
        typer.secho(f"{len(failures)} input(s) failed (listed above)", err=True, fg="red")
        raise typer.Exit(1)


def predict_all(
    detector: Detector, paths: list[Path], keep: Filtering, output: Output, failures: list[str]
) -> tuple[list[dict], int]:
    """Detect in `paths` batch by batch, write a PNG per image; table rows and images done.
    Files that cannot be read are reported, added to `failures` and skipped."""
    rows: list[dict] = []
    names: set[str] = set()
    done = 0
    with tqdm(total=len(paths), desc="predict", unit="image", disable=not output.progress) as bar:
        for first in range(0, len(paths), output.batch_size):
            batch = []
            for path in paths[first : first + output.batch_size]:
                try:
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")  # e.g. PIL's DecompressionBombWarning
                        batch.append(read_photo(path, detector.card.image))
                    for message in dict.fromkeys(str(w.message) for w in caught):  # once each
                        with tqdm.external_write_mode(file=sys.stderr):  # one line, not two
                            common.warn(f"{path}: {message}")
                except ImageError as error:
                    failures.append(str(error))
                    with tqdm.external_write_mode(file=sys.stderr):  # above the progress bar
                        typer.secho(f"error: {error}", err=True, fg=typer.colors.RED)
            found = detect(detector, batch, keep) if batch else []
            for photo, detections in zip(batch, found, strict=True):
                rows.extend(table_rows(photo.path, detections, detector.classes))
                with atomic_file(output.folder / unique_name(photo.path, names)) as tmp:
                    drawn = draw(detector, photo.image, detections, output.show_grid)
                    drawn.save(tmp, format="PNG")
            done += len(batch)
            bar.update(len(paths[first : first + output.batch_size]))
    return rows, done


def write_table(rows: list[dict], table: Path) -> Path:
    """The detections as JSON records or a Parquet table (by the file's suffix)."""
    if table.suffix == ".json":
        write_json(table, rows)
    else:
        with atomic_file(table) as tmp:
            pd.DataFrame(rows, columns=TABLE_COLUMNS).to_parquet(tmp, index=False)
    return table


if __name__ == "__main__":
    common.main(app)
