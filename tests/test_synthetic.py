"""The synthetic generator: deterministic, valid VOC, configured classes and sizes."""

from __future__ import annotations

import dataclasses
import re

import pytest
from PIL import Image

from pipeline_lib.base.params import parse_params
from pipeline_lib.data.synthetic import generate_dataset
from pipeline_lib.data.voc import read_voc


@pytest.fixture
def tiny(raw_params):
    raw_params["data"]["synthetic"].update(n_train=12, n_val=4, min_side=100, max_side=180)
    return parse_params(raw_params).data.synthetic


def annotations(folder):
    return {p.name: p.read_bytes() for p in sorted((folder / "Annotations").glob("*.xml"))}


def test_same_seed_gives_byte_identical_annotations(tiny, tmp_path):
    generate_dataset(tmp_path / "a", tiny, progress=False)
    generate_dataset(tmp_path / "b", tiny, workers=2, progress=False)
    first = annotations(tmp_path / "a")
    assert len(first) == 16 and first == annotations(tmp_path / "b")
    generate_dataset(tmp_path / "c", dataclasses.replace(tiny, seed=1), progress=False)
    assert annotations(tmp_path / "c") != first


def test_scene_does_not_depend_on_dataset_size(tiny, tmp_path):
    generate_dataset(tmp_path / "small", tiny, progress=False)
    generate_dataset(tmp_path / "large", dataclasses.replace(tiny, n_train=20), progress=False)
    small, large = annotations(tmp_path / "small"), annotations(tmp_path / "large")
    assert all(large[name] == small[name] for name in list(small)[:12])


def test_valid_voc_with_configured_classes_and_sizes(tiny, tmp_path):
    params = dataclasses.replace(tiny, classes=["star", "cross"], max_objects=3)
    generate_dataset(tmp_path / "d", params, progress=False)
    # The strict VOC reader checks boxes inside images and sizes against the JPEGs.
    rows = read_voc(
        tmp_path / "d", {"train": "train", "val": "val"}, ["star", "cross"], progress=False
    )
    assert [i["split"] for i in rows.images] == ["train"] * 12 + ["val"] * 4
    assert {o["class_name"] for o in rows.objects} == {"star", "cross"}
    for image in rows.images:
        assert 100 <= image["width"] <= 180 and 100 <= image["height"] <= 180
        assert 1 <= image["n_objects"] <= 3
    trainval = (tmp_path / "d" / "ImageSets" / "Main" / "trainval.txt").read_text().split()
    assert len(trainval) == 16


def test_flags_follow_their_definitions(tiny, tmp_path):
    generate_dataset(tmp_path / "e", dataclasses.replace(tiny, n_train=40), progress=False)
    rows = read_voc(tmp_path / "e", {"train": "train"}, tiny.classes, progress=False)
    size = {i["image_id"]: (i["width"], i["height"]) for i in rows.images}
    for o in rows.objects:
        width, height = size[o["image_id"]]
        touches_border = (
            o["xmin"] == 1 or o["ymin"] == 1 or o["xmax"] == width or o["ymax"] == height
        )
        if o["truncated"]:
            assert touches_border
        narrow = min(o["xmax"] - o["xmin"], o["ymax"] - o["ymin"]) < tiny.difficult_below
        assert o["difficult"] == narrow
    assert any(o["truncated"] for o in rows.objects) and any(o["difficult"] for o in rows.objects)
    assert any(o["occluded"] for o in rows.objects)


def test_images_are_jpegs_matching_the_xml(tiny, tmp_path):
    generate_dataset(tmp_path / "f", tiny, progress=False)
    xml = (tmp_path / "f" / "Annotations" / "000003.xml").read_text()
    width = int(re.search(r"<width>(\d+)</width>", xml).group(1))
    with Image.open(tmp_path / "f" / "JPEGImages" / "000003.jpg") as image:
        assert image.format == "JPEG" and image.width == width
