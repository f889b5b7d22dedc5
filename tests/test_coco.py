"""COCO-format datasets: hand-written instances files; VOC -> COCO -> tables on the real subset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import VocFolder, invoke, tiny_params, voc_xml
from PIL import Image

from pipeline_lib.data.coco import annotation_path, read_categories, read_coco, voc_to_coco
from pipeline_lib.data.voc import VOC_CLASSES, AnnotationError, DatasetError, read_voc


def write_coco(root: Path, split: str, images, annotations, categories=None) -> Path:
    """An instances file and its images (solid colour, the stated sizes)."""
    categories = categories or [{"id": 3, "name": "dog"}, {"id": 1, "name": "cat"}]
    (root / split).mkdir(parents=True, exist_ok=True)
    for image in images:
        if isinstance(image, dict) and isinstance(image.get("file_name"), str):
            path = root / split / image["file_name"]
            if "/" not in image["file_name"] and not path.exists():
                Image.new("RGB", (max(image["width"], 1), image["height"])).save(path)
    path = annotation_path(root, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return path


def image(n, name=None, width=100, height=80):
    return {"id": n, "file_name": name or f"img{n}.jpg", "width": width, "height": height}


def box(n, image_id, bbox, category=1, crowd=0):
    return {"id": n, "image_id": image_id, "bbox": bbox, "category_id": category, "iscrowd": crowd}


def test_boxes_classes_crowds_and_empty_images_by_hand(tmp_path):
    write_coco(
        tmp_path,
        "tr",
        [image(7), image(9, width=50, height=40)],
        [
            box(1, 7, [10, 20, 30.5, 40]),
            box(2, 7, [0, 0, 100, 80], category=3, crowd=1),
            {"id": 3, "image_id": 9, "bbox": [5, 5, 2, 0.5], "category_id": 3},  # no iscrowd
        ],
    )
    write_coco(tmp_path, "va", [image(1, "v.jpg")], [box(1, 1, [-0.4, 5, 100.9, 10])])  # overhang
    rows, names, ids = read_coco(tmp_path, {"train": "tr", "val": "va"}, progress=False)
    assert names == ["cat", "dog"] and ids == [1, 3]  # category id order, names kept
    assert [(i["image_id"], i["split"], i["path"], i["n_objects"]) for i in rows.images] == [
        ("img7", "train", "tr/img7.jpg", 2),
        ("img9", "train", "tr/img9.jpg", 1),
        ("v", "val", "va/v.jpg", 1),
    ]
    assert rows.images[0] == {  # the columns of a VOC image row, with the module's defaults
        "image_id": "img7",
        "path": "tr/img7.jpg",
        "annotation": "annotations/instances_tr.json",
        "filename": "img7.jpg",
        "width": 100,
        "height": 80,
        "depth": 3,
        "segmented": False,
        "n_objects": 2,
        "split": "train",
    }
    first, crowd, small, clipped = rows.objects
    assert first == {
        "image_id": "img7",
        "object_index": 0,
        "class_name": "cat",
        "class_id": 0,
        "xmin": 10.0,
        "ymin": 20.0,
        "xmax": 40.5,
        "ymax": 60.0,
        "difficult": False,
        "truncated": False,
        "occluded": None,
        "pose": "Unspecified",
    }
    assert (small["image_id"], small["object_index"], small["difficult"]) == ("img9", 0, False)
    assert (small["ymin"], small["ymax"]) == (5, 5.5)  # half a pixel high: an area all the same
    assert (crowd["class_name"], crowd["difficult"], crowd["xmax"]) == ("dog", True, 100)
    assert [clipped[k] for k in ("xmin", "xmax")] == [0, 100]  # clipped to the image


@pytest.mark.parametrize(
    ("images", "annotations", "field", "words"),
    [
        (
            [image(1)],
            [box(1, 1, [10, 10, 0, 5])],
            "annotations[0].bbox",
            "[10, 10, 0, 5] has no area or is not finite",
        ),
        (
            [image(1)],
            [box(1, 1, [10, 10, "5", 5])],
            "annotations[0].bbox",
            "[10, 10, '5', 5] is not [x, y, width, height]",
        ),
        (
            [image(1)],
            [box(1, 1, [10, 10, 5])],
            "annotations[0].bbox",
            "[10, 10, 5] is not [x, y, width, height]",
        ),
        (
            [image(1)],
            [box(1, 1, [10, float("nan"), 5, 5])],
            "annotations[0].bbox",
            "[10, nan, 5, 5] has no area or is not finite",
        ),
        (
            [image(1)],
            [box(1, 1, [98, 10, 5, 5])],
            "annotations[0].bbox",
            "[98, 10, 5, 5] lies outside the 100x80 image",
        ),
        (
            [image(1)],
            [box(1, 1, [10, 10, 5, 5], category=2)],
            "annotations[0].category_id",
            "2 is not a category",
        ),
        (
            [image(1, "../up.jpg")],
            [],
            "images[0].file_name",
            "'../up.jpg' is not a plain file name",
        ),
        (
            [image(1, "/etc/passwd")],
            [],
            "images[0].file_name",
            "'/etc/passwd' is not a plain file name",
        ),
        (
            [image(1, "my photo.jpg")],
            [],
            "images[0].file_name",
            "'my photo' is not a plain image id",
        ),
        ([{**image(1), "width": 0}], [], "images[0].width", "0 is not a positive whole number"),
        (
            [{**image(1), "height": True}],
            [],
            "images[0].height",
            "True is not a positive whole number",
        ),
        (
            [image(1)],
            [box(1, 1, [10, 10, 5, 0])],
            "annotations[0].bbox",
            "[10, 10, 5, 0] has no area or is not finite",
        ),
        (
            [image(1)],
            [box(1, 1, [100, 10, 0.5, 5])],
            "annotations[0].bbox",
            "[100, 10, 0.5, 5] lies outside the 100x80 image",
        ),
        (
            [image(1)],
            [box(1, 1, [10, 80, 5, 0.5])],
            "annotations[0].bbox",
            "[10, 80, 5, 0.5] lies outside the 100x80 image",
        ),
        (
            [image(1), image(2, "img1.jpg")],
            [],
            "images[1].file_name",
            "'img1' also in instances_tr.json",
        ),
    ],
)
def test_bad_entries_name_file_and_field(tmp_path, images, annotations, field, words):
    path = write_coco(tmp_path, "tr", images, annotations)
    with pytest.raises(AnnotationError) as info:
        read_coco(tmp_path, {"train": "tr"}, progress=False)
    assert info.value.field == field and info.value.message == words
    assert str(path) in str(info.value)
    rows, _, _ = read_coco(tmp_path, {"train": "tr"}, on_error="skip", progress=False)
    assert len(rows.skipped) == 1 and words in rows.skipped[0]["reason"]


def test_size_mismatch_missing_image_and_bad_files(tmp_path):
    write_coco(tmp_path, "tr", [image(1)], [])
    Image.new("RGB", (99, 80)).save(tmp_path / "tr" / "img1.jpg")
    path = annotation_path(tmp_path, "tr")
    assert read_error(tmp_path, error=AnnotationError) == (
        f"{path}: images[0].width: says 100x80 but tr/img1.jpg is 99x80"
    )
    (tmp_path / "tr" / "img1.jpg").unlink()
    assert read_error(tmp_path, error=AnnotationError) == (
        f"{path}: filename: image {tmp_path / 'tr' / 'img1.jpg'} does not exist"
    )
    annotation_path(tmp_path, "tr").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        read_coco(tmp_path, {"train": "tr"}, progress=False)
    annotation_path(tmp_path, "tr").write_text("[]")
    with pytest.raises(DatasetError, match="top level is not an object"):
        read_coco(tmp_path, {"train": "tr"}, progress=False)
    with pytest.raises(DatasetError, match="instances_nope.json: COCO annotation file not found"):
        read_coco(tmp_path, {"train": "nope"}, progress=False)
    write_coco(tmp_path, "tr", [image(1)], [box(1, 1, [1, 1, 5, 5]), box(2, 99, [1, 1, 5, 5])])
    with pytest.raises(
        DatasetError, match=r"annotations: 1 refer to no image \(e.g. annotations\[1\]"
    ):
        read_coco(tmp_path, {"train": "tr"}, progress=False)
    write_coco(tmp_path, "tr", [image(1)], [])
    write_coco(tmp_path, "va", [image(2)], [], categories=[{"id": 1, "name": "cat"}])
    with pytest.raises(DatasetError, match="categories differ"):
        read_coco(tmp_path, {"train": "tr", "val": "va"}, progress=False)


def test_voc_to_coco_and_back_gives_the_same_tables(shared_voc, tmp_path):
    """The genuine VOC2007 subset, both splits, through COCO JSON: identical rows."""
    classes = list(VOC_CLASSES)
    for split in ("train", "val"):
        voc_to_coco(shared_voc, split, classes, tmp_path / "coco")
    data = json.loads(annotation_path(tmp_path / "coco", "val").read_text())
    assert len(data["images"]) == 186 and len(data["annotations"]) == 636
    rows, names, ids = read_coco(
        tmp_path / "coco", {"train": "train", "val": "val"}, progress=False
    )
    voc = read_voc(shared_voc, {"train": "train", "val": "val"}, classes, progress=False)
    assert names == classes and ids == list(range(1, 21))
    keys = ("image_id", "split", "width", "height", "n_objects")
    assert [tuple(i[k] for k in keys) for i in rows.images] == [
        tuple(i[k] for k in keys) for i in voc.images
    ]
    keys = (
        "image_id",
        "object_index",
        "class_name",
        "class_id",
        "xmin",
        "ymin",
        "xmax",
        "ymax",
        "difficult",
    )
    assert [tuple(o[k] for k in keys) for o in rows.objects] == [
        tuple(o[k] for k in keys) for o in voc.objects
    ]


@pytest.mark.stages
def test_every_stage_runs_unchanged_on_a_coco_source(tmp_path, monkeypatch, raw_params):
    """The synthetic set converted with `python -m stages.convert`, then the chain on it."""
    from stages import convert, evaluate, extract, prepare, synthesize, train

    monkeypatch.chdir(tmp_path)
    tiny_params(raw_params, epochs=1)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw_params))
    invoke(synthesize.app, ["--workers", "1"])
    classes = raw_params["data"]["synthetic"]["classes"]
    invoke(
        convert.app,
        [
            "data/synthetic/VOCdevkit/VOCshapes",
            "coco",
            "--split",
            "train",
            "--split",
            "val",
            "--classes",
            ",".join(classes),
        ],
    )
    raw_params["data"].update(source="coco", root="coco")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw_params))
    invoke(prepare.app, [])
    invoke(extract.app, [])
    invoke(train.app, ["multi", "--no-progress"])
    invoke(evaluate.app, ["multi"])

    info = json.loads((tmp_path / "data/prepared/dataset.json").read_text())
    assert info["source"] == "coco" and info["classes"] == classes
    assert info["coco_category_ids"] == list(range(1, len(classes) + 1))
    xml_objects = sum(
        (tmp_path / "data/synthetic/VOCdevkit/VOCshapes/Annotations" / f"{i}.xml")
        .read_text()
        .count("<object>")
        for i in (tmp_path / "data/synthetic/VOCdevkit/VOCshapes/ImageSets/Main/val.txt")
        .read_text()
        .split()
    )
    metrics = json.loads((tmp_path / "reports/evaluate_multi/metrics.json").read_text())
    assert metrics["images"] == 4 and metrics["objects"] == xml_objects
    assert metrics["overlap"] == "continuous"  # COCO's coordinates: no VOC pixel convention


def read_error(root: Path, splits=None, error=DatasetError) -> str:
    """The message of the error reading `splits` (train: tr) of `root` raises."""
    with pytest.raises(error) as info:
        read_coco(root, splits or {"train": "tr"}, progress=False)
    return str(info.value)


def test_whole_file_problems_are_named_in_full(tmp_path):
    path = write_coco(tmp_path, "tr", [image(1)], [], categories=[{"id": 1}])
    assert read_error(tmp_path) == (f"{path}: categories: each needs an id and a name ('name')")
    for categories in ([], [{"id": 1, "name": "cat"}, {"id": 2, "name": "cat"}]):
        data = {"images": [image(1)], "annotations": [], "categories": categories}
        path.write_text(json.dumps(data))
        names = [c["name"] for c in categories]
        assert read_error(tmp_path) == f"{path}: categories: none, or names listed twice: {names}"
    for key in ("images", "annotations"):
        data = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "cat"}]}
        data[key] = {"not": "a list"}
        path.write_text(json.dumps(data))
        assert read_error(tmp_path) == f"{path}: {key}: missing or not a list"
    write_coco(tmp_path, "tr", [image(1)], [box(1, 5, [1, 1, 5, 5]), box(2, 5, [1, 1, 5, 5])])
    assert read_error(tmp_path) == (
        f"{path}: annotations: 2 refer to no image (e.g. annotations[0])"
    )
    data = {"images": [image(1)], "annotations": ["junk"], "categories": [{"id": 1, "name": "c"}]}
    path.write_text(json.dumps(data))  # an annotation that is not an object belongs to no image
    assert read_error(tmp_path) == (
        f"{path}: annotations: 1 refer to no image (e.g. annotations[0])"
    )
    write_coco(tmp_path, "tr", [image(1)], [])
    val = write_coco(tmp_path, "va", [image(2)], [], categories=[{"name": "cat"}])
    assert read_error(tmp_path, {"train": "tr", "val": "va"}) == (
        f"{val}: categories: each needs an id and a name ('id')"
    )
    with pytest.raises(ValueError) as info:
        read_coco(tmp_path, {"train": "tr"}, on_error="ignore")
    assert str(info.value) == "on_error must be 'raise' or 'skip', got 'ignore'"


def test_boxes_may_overhang_by_one_pixel_and_must_keep_an_area(tmp_path):
    kept = [box(1, 1, [-1.0, -1.0, 50, 20]), box(2, 1, [60, 70, 41, 11])]  # 1 px past each side
    write_coco(tmp_path, "tr", [image(1)], kept)
    rows, _, _ = read_coco(tmp_path, {"train": "tr"}, progress=False)
    assert [(o["xmin"], o["ymin"], o["xmax"], o["ymax"]) for o in rows.objects] == [
        (0, 0, 49, 19),
        (60, 70, 100, 80),
    ]
    for bbox in ([-1.5, 0, 10, 10], [0, -1.01, 10, 10], [90, 0, 11.5, 10], [0, 70, 10, 11.5]):
        path = write_coco(tmp_path, "tr", [image(1)], [box(1, 1, bbox)])
        message = read_error(tmp_path, error=AnnotationError)
        assert message.endswith(f"{bbox!r} lies outside the 100x80 image"), message
        assert message.startswith(f"{path}: annotations[0].bbox: ")
    write_coco(tmp_path, "tr", [image(1)], [box(1, 1, [100.2, 10, 0.5, 5])])  # right of the image
    assert read_error(tmp_path, error=AnnotationError).endswith(
        "[100.2, 10, 0.5, 5] lies outside the 100x80 image"
    )


def test_skipped_entries_keep_their_split_and_a_name(tmp_path, capsys):
    write_coco(tmp_path, "tr", [image(1), "not an object", {**image(3), "width": -2}], [])
    rows, _, _ = read_coco(tmp_path, {"train": "tr"}, on_error="skip")  # progress by default
    path = annotation_path(tmp_path, "tr")
    assert [r["image_id"] for r in rows.images] == ["img1"] and rows.images[0]["split"] == "train"
    assert rows.skipped == [
        {"image_id": "images[1]", "split": "train", "reason": f"{path}: images[1]: not an object"},
        {
            "image_id": "img3",
            "split": "train",
            "reason": f"{path}: images[2].width: -2 is not a positive whole number",
        },
    ]
    shown = capsys.readouterr().err
    assert "read instances_tr.json: 100%|" in shown and "3/3 [" in shown and "image/s]" in shown


def test_paths_categories_and_a_quiet_read(tmp_path, capsys):
    assert annotation_path(Path("coco"), "val") == Path("coco/annotations/instances_val.json")
    path = write_coco(tmp_path, "tr", [image(1, width=1, height=1)], [])  # 1 x 1 is whole
    assert read_categories(path) == (["cat", "dog"], [1, 3])  # read from the file
    rows, names, ids = read_coco(tmp_path, {"train": "tr"}, progress=False)
    assert (rows.images[0]["width"], rows.images[0]["height"]) == (1, 1)
    assert capsys.readouterr().err == ""  # progress=False: no bar
    rows, names, ids = read_coco(tmp_path, {}, progress=False)
    assert (rows.images, names, ids) == ([], [], [])


def test_voc_to_coco_by_hand(tmp_path, capsys):
    voc = VocFolder(tmp_path / "VOC2007")
    one = "<object><name>dog</name><difficult>1</difficult><bndbox><xmin>1</xmin><ymin>2</ymin>"
    one += "<xmax>11</xmax><ymax>7</ymax></bndbox></object>"
    voc.add("a", voc_xml("a.jpg", objects=[]))
    voc.add("b", voc_xml("b.jpg", objects=[one, one.replace("dog", "cat")]))
    voc.split("val", ["a", "b"])
    out = voc_to_coco(voc.root, "val", ["cat", "dog"], tmp_path / "coco")
    assert out == tmp_path / "coco" / "annotations" / "instances_val.json"
    assert capsys.readouterr().err == ""  # no progress bar of its own
    crowd = {"bbox": [1.0, 2.0, 10.0, 5.0], "area": 50.0, "iscrowd": 1}
    assert json.loads(out.read_text()) == {
        "info": {"description": "VOC2007 val, converted from PASCAL VOC"},
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": 100, "height": 80},
            {"id": 2, "file_name": "b.jpg", "width": 100, "height": 80},
        ],
        "annotations": [
            {"id": 1, "image_id": 2, "category_id": 2} | crowd,
            {"id": 2, "image_id": 2, "category_id": 1} | crowd,
        ],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }
    assert (tmp_path / "coco" / "val").resolve() == (voc.root / "JPEGImages").resolve()
