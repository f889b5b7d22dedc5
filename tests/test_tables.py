"""The prepared tables (data/tables.py): written whole with their schemas and class list, read
back as written, refused naming what is missing, and summarised per split by hand-counted
examples."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from pipeline_lib.base.errors import PipelineError
from pipeline_lib.data.tables import read_prepared, split_report, write_prepared

CLASSES = ["cat", "dog", "cow"]


def image(image_id: str, split: str, n_objects: int) -> dict:
    return {
        "image_id": image_id,
        "split": split,
        "path": f"JPEGImages/{image_id}.jpg",
        "annotation": f"Annotations/{image_id}.xml",
        "filename": f"{image_id}.jpg",
        "width": 500,
        "height": 375,
        "depth": 3,
        "segmented": False,
        "n_objects": n_objects,
    }


def obj(image_id: str, index: int, name: str, difficult=False, truncated=False) -> dict:
    return {
        "image_id": image_id,
        "object_index": index,
        "class_name": name,
        "class_id": CLASSES.index(name),
        "xmin": 1.0,
        "ymin": 2.0,
        "xmax": 100.0,
        "ymax": 200.0,
        "difficult": difficult,
        "truncated": truncated,
        "occluded": None,
        "pose": "Unspecified",
    }


@pytest.fixture
def prepared_dir(tmp_path):
    images = [image("a", "train", 2), image("b", "train", 1), image("c", "val", 1)]
    objects = [
        obj("a", 0, "cat"),
        obj("a", 1, "dog", difficult=True),
        obj("b", 0, "cat", truncated=True),
        obj("c", 0, "dog"),
    ]
    info = {"classes": CLASSES, "dataset_dir": "/data/VOC2007", "splits": {"train": "trainval"}}
    write_prepared(tmp_path / "prepared", images, objects, info)
    return tmp_path / "prepared"


def test_the_tables_are_read_back_as_written_with_the_classes_in_their_schema(prepared_dir):
    prepared = read_prepared(prepared_dir)
    assert prepared.classes == CLASSES and prepared.info["splits"] == {"train": "trainval"}
    assert prepared.images["image_id"].tolist() == ["a", "b", "c"]
    assert prepared.objects["class_id"].tolist() == [0, 1, 0, 1]
    assert prepared.objects["occluded"].isna().all()  # nullable: no <occluded> in the XML
    for name in ("images.parquet", "objects.parquet"):
        metadata = pq.read_schema(prepared_dir / name).metadata
        assert json.loads(metadata[b"classes"]) == CLASSES
    assert str(pq.read_schema(prepared_dir / "images.parquet").field("width").type) == "int32"
    files = dict(prepared.split_files())
    assert list(files) == ["train", "val"]
    assert files["train"] == {
        "a": prepared.dataset_dir / "JPEGImages/a.jpg",
        "b": prepared.dataset_dir / "JPEGImages/b.jpg",
    }


def test_a_row_outside_the_schema_is_refused_before_anything_is_written(tmp_path):
    bad = image("a", "train", 0) | {"width": "wide"}
    with pytest.raises((TypeError, ValueError)):
        write_prepared(tmp_path / "prepared", [bad], [], {"classes": CLASSES})
    assert not (tmp_path / "prepared").exists()


def test_missing_tables_are_named_with_the_stage_to_run(prepared_dir):
    (prepared_dir / "objects.parquet").unlink()
    with pytest.raises(PipelineError) as raised:
        read_prepared(prepared_dir)
    assert str(raised.value) == (
        f"{prepared_dir}: no prepared tables (objects.parquet missing); run the prepare stage "
        "first (dvc repro prepare)"
    )


def test_the_split_report_counts_by_hand(prepared_dir):
    skipped = [{"split": "val", "image_id": "d"}, {"split": "val", "image_id": "e"}]
    summary, metrics, per_class = split_report(
        read_prepared(prepared_dir), ["train", "val"], skipped
    )
    # train: a (cat, difficult dog) and b (truncated cat); val: c (dog), two images skipped
    assert summary["train"] == {
        "images": 2,
        "objects": 3,
        "difficult": 1,
        "truncated": 1,
        "objects_per_class": {"cat": 2, "dog": 1, "cow": 0},  # every class, 0 when absent
        "skipped": 0,
    }
    assert metrics["val"] == {
        "images": 1,
        "objects": 1,
        "difficult": 0,
        "truncated": 0,
        "skipped": 2,
    }
    assert per_class[:3] == [
        {"split": "train", "class": "cat", "objects": 2},
        {"split": "train", "class": "dog", "objects": 1},
        {"split": "train", "class": "cow", "objects": 0},
    ]
    assert len(per_class) == 6
