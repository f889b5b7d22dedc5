"""Which reader a `data.source` uses, and what `prepare` records about where the data came from.

- `read_source`: the annotations of data.train_split / data.val_split as `voc.VocRows`, read from
  the synthetic dataset, a VOCdevkit folder (downloading VOC2012 first with data.download) or a
  COCO-format folder, with the dataset folder, the class names and dataset.json's entries.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline_lib.base.params import DataParams
from pipeline_lib.data.coco import read_coco
from pipeline_lib.data.voc import VOC_CLASSES, VocRows, download_voc2012, read_voc


@dataclass
class Source:
    """The annotations read, and where they came from."""

    rows: VocRows
    dataset_dir: Path
    classes: list[str]
    info: dict  # data/prepared/dataset.json


def read_source(data: DataParams, synthetic_dataset: Path) -> Source:
    """Read data.source's train and val splits (a `DatasetError` for bad annotations unless
    data.on_error skips them; the rows may then hold no image: the caller says so)."""
    splits = {"train": data.train_split, "val": data.val_split}
    extra = {}
    if data.source == "coco":
        dataset_dir = Path(data.root)
        rows, classes, category_ids = read_coco(dataset_dir, splits, data.on_error)
        extra["coco_category_ids"] = category_ids
    else:
        if data.source == "synthetic":
            dataset_dir, classes = synthetic_dataset, list(data.synthetic.classes)
        else:
            if data.download:
                download_voc2012(Path(data.root).parent)
            dataset_dir, classes = Path(data.root) / f"VOC{data.year}", list(VOC_CLASSES)
        rows = read_voc(dataset_dir, splits, classes, on_error=data.on_error)
    info = {
        "source": data.source,
        "dataset_dir": dataset_dir.as_posix(),
        "classes": classes,
        "splits": splits,
        **extra,
    }
    return Source(rows, dataset_dir, classes, info)
