"""The prepared annotation tables: explicit Arrow schemas, writing, reading, and summaries.

`data/prepared/` holds
- `images.parquet`: one row per image (IMAGE_SCHEMA),
- `objects.parquet`: one row per object (OBJECT_SCHEMA), coordinates exactly as in the XML,
- `dataset.json`: the class list in id order, the dataset folder and the split lists used.
The class list is also stored in both Parquet files' schema metadata (key `classes`, JSON).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline_lib.base.errors import PipelineError
from pipeline_lib.base.files import atomic_dir

IMAGE_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),  # role: train | val
        pa.field("path", pa.string(), nullable=False),  # relative to the dataset folder
        pa.field("annotation", pa.string(), nullable=False),  # relative to the dataset folder
        pa.field("filename", pa.string(), nullable=False),  # <filename> as in the XML
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("depth", pa.int32(), nullable=False),
        pa.field("segmented", pa.bool_(), nullable=False),
        pa.field("n_objects", pa.int32(), nullable=False),
    ]
)
OBJECT_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("object_index", pa.int32(), nullable=False),  # position among <object> elements
        pa.field("class_name", pa.string(), nullable=False),
        pa.field("class_id", pa.int32(), nullable=False),  # index into the class list
        pa.field("xmin", pa.float64(), nullable=False),  # VOC 1-based pixel coordinates
        pa.field("ymin", pa.float64(), nullable=False),
        pa.field("xmax", pa.float64(), nullable=False),
        pa.field("ymax", pa.float64(), nullable=False),
        pa.field("difficult", pa.bool_(), nullable=False),
        pa.field("truncated", pa.bool_(), nullable=False),
        pa.field("occluded", pa.bool_(), nullable=True),  # null where the XML has no <occluded>
        pa.field("pose", pa.string(), nullable=False),
    ]
)


@dataclass
class Prepared:
    """The tables as pandas frames plus `dataset.json`'s content."""

    images: pd.DataFrame
    objects: pd.DataFrame
    info: dict

    @property
    def classes(self) -> list[str]:
        return self.info["classes"]

    @property
    def dataset_dir(self) -> Path:
        return Path(self.info["dataset_dir"])

    def split_files(self) -> Iterator[tuple[str, dict[str, Path]]]:
        """(split, {image id: image file}) per split, in table order."""
        for split, rows in self.images.groupby("split", sort=False):
            paths = [self.dataset_dir / p for p in rows["path"]]
            yield split, dict(zip(rows["image_id"], paths, strict=True))


def write_prepared(
    out_dir: str | Path, images: list[dict], objects: list[dict], info: dict
) -> None:
    """Write both tables and dataset.json into `out_dir`, replacing it only once all are written.

    `info` must hold `classes` (names in id order); it is stored as given in dataset.json.
    """
    metadata = {b"classes": json.dumps(list(info["classes"])).encode()}
    image_table = pa.Table.from_pylist(images, schema=IMAGE_SCHEMA.with_metadata(metadata))
    object_table = pa.Table.from_pylist(objects, schema=OBJECT_SCHEMA.with_metadata(metadata))
    with atomic_dir(out_dir) as tmp:
        pq.write_table(image_table, tmp / "images.parquet")
        pq.write_table(object_table, tmp / "objects.parquet")
        (tmp / "dataset.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def read_prepared(out_dir: str | Path) -> Prepared:
    """Read what `write_prepared` wrote."""
    out_dir = Path(out_dir)
    missing = [
        n
        for n in ("dataset.json", "images.parquet", "objects.parquet")
        if not (out_dir / n).is_file()
    ]
    if missing:
        raise PipelineError(
            f"{out_dir}: no prepared tables ({', '.join(missing)} missing); run the prepare "
            "stage first (dvc repro prepare)"
        )
    info = json.loads((out_dir / "dataset.json").read_text(encoding="utf-8"))
    images = pq.read_table(out_dir / "images.parquet").to_pandas()
    objects = pq.read_table(out_dir / "objects.parquet").to_pandas()
    return Prepared(images=images, objects=objects, info=info)


def split_summary(
    images: pd.DataFrame, objects: pd.DataFrame, classes: list[str], splits: list[str]
) -> dict:
    """Counts per split: images, objects, difficult, truncated, and objects per class.

    Every split and class appears (0 when absent) so that metrics diff cleanly.
    """
    split_of = images.set_index("image_id")["split"]
    objects = objects.assign(split=objects["image_id"].map(split_of))
    summary = {}
    for split in splits:
        mine = objects[objects["split"] == split]
        per_class = mine["class_name"].value_counts()
        summary[split] = {
            "images": int((images["split"] == split).sum()),
            "objects": len(mine),
            "difficult": int(mine["difficult"].sum()),
            "truncated": int(mine["truncated"].sum()),
            "objects_per_class": {name: int(per_class.get(name, 0)) for name in classes},
        }
    return summary


def split_report(
    prepared: Prepared, splits: list[str], skipped: list[dict]
) -> tuple[dict, dict, list[dict]]:
    """prepare's report of the tables: (`split_summary` with each split's skipped images counted,
    the DVC metrics: that summary without the per-class counts, one {split, class, objects} row
    per split and class)."""
    summary = split_summary(prepared.images, prepared.objects, prepared.classes, splits)
    for role, stats in summary.items():
        stats["skipped"] = sum(skip["split"] == role for skip in skipped)
    per_class = [
        {"split": role, "class": name, "objects": count}
        for role, stats in summary.items()
        for name, count in stats["objects_per_class"].items()
    ]
    metrics = {
        role: {k: v for k, v in stats.items() if k != "objects_per_class"}
        for role, stats in summary.items()
    }
    return summary, metrics, per_class
