"""Convert a VOC-layout dataset to COCO format (a tool, not a DVC stage).

    python -m stages.convert VOCdevkit/VOC2007 out/ --split train --split val [--classes a,b,c]

Writes out/annotations/instances_<split>.json per split and links out/<split> to the dataset's
JPEGImages folder (no image is copied). The result is read by `data.source: coco` with
`data.root: out`, `data.train_split: train`, `data.val_split: val`; see
pipeline_lib/data/coco.py for the conventions (categories 1..K in class order, difficult objects
as iscrowd, boxes unshifted).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline_lib.data.coco import voc_to_coco
from pipeline_lib.data.voc import VOC_CLASSES
from stages import common
from stages.common import clean_errors

app = typer.Typer(add_completion=False)


@app.command()
def main(
    dataset: Annotated[Path, typer.Argument(help="A VOC dataset folder (holding Annotations/).")],
    out: Annotated[Path, typer.Argument(help="Folder for annotations/ and the image links.")],
    split: Annotated[list[str] | None, typer.Option(help="ImageSets/Main lists.")] = None,
    classes: Annotated[str, typer.Option(help="Comma-separated class names; default VOC's 20.")] = (
        ",".join(VOC_CLASSES)
    ),
) -> None:
    """Write each split of a VOC dataset as a COCO instances file."""
    with clean_errors():
        for name in split or ["train", "val"]:
            path = voc_to_coco(dataset, name, classes.split(","), out)
            typer.echo(f"{name}: {path}")


if __name__ == "__main__":
    common.main(app)
