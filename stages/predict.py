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
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import pandas as pd
import typer
from tqdm import tqdm

from pipeline_lib.detection import Detections
from pipeline_lib.features import ImageError
from pipeline_lib.files import atomic_file, write_json
from pipeline_lib.inference import Detector, cell_rectangles, detect, load_detector, open_photo
from pipeline_lib.plots import annotate
from stages.common import MODELS_DIR, clean_errors

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
DEFAULT_MODEL = MODELS_DIR / "multi.safetensors"
DEFAULT_OUT = Path("predictions")
COLUMNS = ["image", "class", "score", "xmin", "ymin", "xmax", "ymax"]


class Format(StrEnum):
    parquet = "parquet"
    json = "json"


app = typer.Typer(add_completion=False)


@app.command()
def main(
    images: Annotated[list[Path], typer.Argument(help="Image files and/or folders of images.")],
    model: Annotated[Path, typer.Option(help="A trained model file.")] = DEFAULT_MODEL,
    out: Annotated[Path, typer.Option(help="Folder for the PNGs and the table.")] = DEFAULT_OUT,
    score: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Grid head: lowest score kept.")
    ] = 0.2,
    nms_iou: Annotated[float, typer.Option(min=0.0, max=1.0, help="Grid head: NMS IoU.")] = 0.5,
    max_detections: Annotated[
        int, typer.Option(min=1, help="Grid head: most boxes per image.")
    ] = 100,
    format: Annotated[
        Format, typer.Option(help="Format of the detections table.")
    ] = Format.parquet,
    show_grid: Annotated[bool, typer.Option(help="Draw the grid head's cells.")] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per backbone call.")] = 16,
    device: Annotated[str, typer.Option(help="auto (GPU if there is one) | cpu | cuda.")] = "auto",
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Detect objects in IMAGES with a trained model; annotated PNGs and a detections table."""
    paths, failures = collect_images(images)
    for failure in failures:
        typer.secho(f"error: {failure}", err=True, fg=typer.colors.RED)
    if not paths:
        raise typer.Exit(1)
    with clean_errors():
        detector = load_detector(model, device)
    show = detector.info["kind"] == "multi" and show_grid
    rows: list[dict] = []
    names: set[str] = set()
    done, start = 0, time.perf_counter()
    bar = tqdm(total=len(paths), desc="predict", unit="image", disable=not progress)
    for first in range(0, len(paths), batch_size):
        batch = []
        for path in paths[first : first + batch_size]:
            try:
                batch.append((path, open_photo(path)))
            except ImageError as error:
                failures.append(str(error))
                with tqdm.external_write_mode(file=sys.stderr):  # above the progress bar
                    typer.secho(f"error: {error}", err=True, fg=typer.colors.RED)
        if batch:
            found = detect(detector, [image for _, image in batch], score, nms_iou, max_detections)
            for (path, image), detections in zip(batch, found, strict=True):
                rows.extend(table_rows(path, detections, detector.classes))
                drawn = draw(detector, image, detections, show)
                with atomic_file(out / unique_name(path, names)) as tmp:
                    drawn.save(tmp, format="PNG")
            done += len(batch)
        bar.update(len(paths[first : first + batch_size]))
    bar.close()
    seconds = time.perf_counter() - start
    table = out / f"detections.{format.value}"
    if format is Format.json:
        write_json(table, rows)
    else:
        with atomic_file(table) as tmp:
            pd.DataFrame(rows, columns=COLUMNS).to_parquet(tmp, index=False)
    images = f"{done} image{'' if done == 1 else 's'}"
    typer.echo(
        f"{images}, {len(rows)} detections, {done / max(seconds, 1e-9):.1f} images/s on "
        f"{detector.device.type} -> {out}/ ({table.name} and one PNG per image)"
    )
    if failures:
        typer.secho(f"{len(failures)} input(s) failed (listed above)", err=True, fg="red")
        raise typer.Exit(1)


def collect_images(arguments: list[Path]) -> tuple[list[Path], list[str]]:
    """Files as given, folders expanded to their image files (sorted); problems as messages."""
    paths, problems = [], []
    for argument in arguments:
        if argument.is_dir():
            found = sorted(p for p in argument.iterdir()
                           if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)  # fmt: skip
            if not found:
                problems.append(f"{argument}: no {'/'.join(IMAGE_SUFFIXES)} images in this folder")
            paths.extend(found)
        elif argument.exists():
            paths.append(argument)
        else:
            problems.append(f"{argument}: no such file or folder")
    return paths, problems


def table_rows(path: Path, detections: Detections, classes: list[str]) -> list[dict]:
    boxes = detections.boxes.tolist()
    pairs = zip(detections.labels.tolist(), detections.scores.tolist(), boxes, strict=True)
    return [
        {"image": str(path), "class": classes[k], "score": round(s, 5),
         **{c: round(v, 2) for c, v in zip(COLUMNS[3:], box, strict=True)}}
        for k, s, box in pairs
    ]  # fmt: skip


def draw(detector: Detector, image, detections: Detections, show_grid: bool):
    texts = [
        f"{detector.classes[k]} {s:.2f}"
        for k, s in zip(detections.labels.tolist(), detections.scores.tolist(), strict=True)
    ]
    cells = cell_rectangles(detector.info, *image.size) if show_grid else None
    return annotate(image, detections.boxes, texts, detections.labels.tolist(), cells)


def unique_name(path: Path, taken: set[str]) -> str:
    """<stem>.png, or <stem>_2.png, ... when two inputs share a stem."""
    name, n = f"{path.stem}.png", 1
    while name in taken:
        n += 1
        name = f"{path.stem}_{n}.png"
    taken.add(name)
    return name


if __name__ == "__main__":
    app()
