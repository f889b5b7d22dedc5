"""The genuine VOC2007 subset in ../shared/voc: counts from its README, values from its files."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline_lib.data.tables import read_prepared, split_summary, write_prepared
from pipeline_lib.data.voc import VOC_CLASSES, read_voc


@pytest.fixture(scope="module")
def trainval(shared_voc):
    return read_voc(shared_voc, {"trainval": "trainval"}, VOC_CLASSES, progress=False)


def test_trainval_counts_match_the_readme(trainval):
    assert len(trainval.images) == 765
    assert len(trainval.objects) == 2456
    assert sum(o["difficult"] for o in trainval.objects) == 521
    assert sum(o["truncated"] for o in trainval.objects) == 1257
    per_class = {}
    for o in trainval.objects:
        per_class[o["class_name"]] = per_class.get(o["class_name"], 0) + 1
    assert {k: per_class[k] for k in ("person", "chair", "car", "bird", "sheep")} == {
        "person": 786,
        "chair": 273,
        "car": 261,
        "bird": 127,
        "sheep": 39,
    }
    assert all(o["occluded"] is None for o in trainval.objects)  # VOC2007 has no <occluded>
    assert trainval.skipped == []


def test_train_and_val_split_counts(shared_voc):
    rows = read_voc(shared_voc, {"train": "train", "val": "val"}, VOC_CLASSES, progress=False)
    by_split = {s: [i for i in rows.images if i["split"] == s] for s in ("train", "val")}
    assert (len(by_split["train"]), len(by_split["val"])) == (579, 186)
    assert sum(i["n_objects"] for i in by_split["train"]) == 1820
    assert sum(i["n_objects"] for i in by_split["val"]) == 636


def test_person_layout_file_by_hand(trainval):
    """000162.xml: a tvmonitor and a person with five <part>s (read off the file by hand)."""
    image = next(i for i in trainval.images if i["image_id"] == "000162")
    assert (image["width"], image["height"], image["n_objects"]) == (500, 375, 2)
    objects = [o for o in trainval.objects if o["image_id"] == "000162"]
    assert [
        (o["class_name"], o["xmin"], o["ymin"], o["xmax"], o["ymax"], o["pose"]) for o in objects
    ] == [
        ("tvmonitor", 306, 227, 380, 299, "Frontal"),
        ("person", 196, 143, 309, 369, "Unspecified"),
    ]


def test_sizes_match_the_jpegs(trainval, shared_voc):
    for image in trainval.images[::25]:
        with Image.open(shared_voc / image["path"]) as jpeg:
            assert jpeg.size == (image["width"], image["height"])


def test_tables_round_trip_with_explicit_schema(trainval, tmp_path):
    info = {"classes": list(VOC_CLASSES), "dataset_dir": "x"}
    write_prepared(tmp_path / "prepared", trainval.images, trainval.objects, info)
    schema = pq.read_schema(tmp_path / "prepared" / "objects.parquet")
    assert str(schema.field("xmin").type) == "double"
    assert schema.field("occluded").nullable and not schema.field("difficult").nullable
    assert schema.metadata[b"classes"].decode().startswith('["aeroplane", "bicycle"')
    prepared = read_prepared(tmp_path / "prepared")
    assert prepared.classes[-1] == "tvmonitor"
    assert str(prepared.images["width"].dtype) == "int32"
    summary = split_summary(prepared.images, prepared.objects, prepared.classes, ["trainval"])
    assert summary["trainval"]["objects"] == 2456
    assert summary["trainval"]["objects_per_class"]["sheep"] == 39
    assert summary["trainval"]["difficult"] == 521
