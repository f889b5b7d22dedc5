"""The VOC parser on small hand-written files: every rule and every bad input of the module doc."""

from __future__ import annotations

import pytest
from conftest import voc_xml

from pipeline_lib.data.voc import AnnotationError, DatasetError, parse_annotation, read_voc

CLASSES = ["cat", "dog", "person"]
IDS = {name: i for i, name in enumerate(CLASSES)}


def obj(name="cat", box=(10, 20, 50, 60), inner=""):
    xmin, ymin, xmax, ymax = box
    return (
        f"<object><name>{name}</name>{inner}<bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin>"
        f"<xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>"
    )


def parse(tmp_path, xml):
    path = tmp_path / "x.xml"
    path.write_text(xml)
    return parse_annotation(path, IDS)


def error_of(tmp_path, xml) -> AnnotationError:
    with pytest.raises(AnnotationError) as info:
        parse(tmp_path, xml)
    assert str(tmp_path / "x.xml") in str(info.value)  # the message names the file
    return info.value


def test_fields_and_documented_defaults(tmp_path):
    image, objects = parse(tmp_path, voc_xml(objects=[obj("dog", (1, 2, 100, 80))]))
    assert image == {
        "filename": "a.jpg",
        "width": 100,
        "height": 80,
        "depth": 3,
        "segmented": False,
    }
    assert objects == [
        {
            "object_index": 0,
            "class_name": "dog",
            "class_id": 1,
            "xmin": 1.0,
            "ymin": 2.0,
            "xmax": 100.0,
            "ymax": 80.0,
            "difficult": False,
            "truncated": False,
            "occluded": None,
            "pose": "Unspecified",
        }
    ]


def test_flags_pose_and_decimal_coordinates(tmp_path):
    inner = (
        "<pose>Left</pose><truncated>1</truncated><occluded>0</occluded><difficult>1</difficult>"
    )
    _, [o] = parse(tmp_path, voc_xml(objects=[obj("cat", ("10.5", "20", "49.75", "60"), inner)]))
    assert (o["xmin"], o["xmax"]) == (10.5, 49.75)
    assert (o["pose"], o["truncated"], o["occluded"], o["difficult"]) == ("Left", True, False, True)


def test_parts_and_owner_are_not_objects(tmp_path):
    part = (
        "<part><name>hand</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax>"
        "<ymax>5</ymax></bndbox></part>"
    )
    owner = "<owner><flickrid>x</flickrid><name>Some Person</name></owner>"
    _, objects = parse(tmp_path, voc_xml(objects=[obj("person", inner=part)], extra=owner))
    assert [o["class_name"] for o in objects] == ["person"]


def sized(size: str, segmented: str = "<segmented>0</segmented>") -> str:
    """An annotation of one cat with `size` as the inside of its <size> element."""
    return (
        f"<annotation><filename>a.jpg</filename><size>{size}</size>{segmented}{obj()}</annotation>"
    )


WH = "<width>100</width><height>80</height>"


def outside(box: tuple[int, int, int, int]) -> tuple[str, str, str]:
    """A case of one object whose box is empty or leaves the 100 x 80 image."""
    message = f"box {box} is empty or outside the 100x80 image"
    return voc_xml(objects=[obj(box=box)]), "object[0]/bndbox", message


def plain(filename: str) -> tuple[str, str, str]:
    """A case of a <filename> that is not a plain name."""
    return (
        voc_xml(filename=filename),
        "filename",
        f"{filename!r} is not a plain file name inside JPEGImages/",
    )


@pytest.mark.parametrize(
    ("xml", "field", "message"),
    [
        ("<annotation><filename>a.jpg</filename", "xml", "malformed XML (unclosed token: "),
        (
            voc_xml(objects=[obj("unicorn")]),
            "object[0]/name",
            "unknown class 'unicorn' (cat, dog, person)",
        ),
        (voc_xml(objects=[obj("")]), "object[0]/name", "empty"),
        (voc_xml(objects=["<object><bndbox/></object>"]), "object[0]/name", "missing"),
        outside((50, 20, 50, 60)),
        outside((10, 60, 50, 60)),
        outside((10, 60, 50, 20)),
        outside((10, 20, 101, 60)),
        outside((-1, 20, 50, 60)),
        (
            voc_xml(objects=[obj(), obj(box=("nan", 1, 2, 3))]),
            "object[1]/bndbox/xmin",
            "'nan' is not a finite number",
        ),
        (
            voc_xml(objects=[obj(box=("ten", 1, 2, 3))]),
            "object[0]/bndbox/xmin",
            "'ten' is not a number",
        ),
        (voc_xml(objects=[obj(box=(1, "", 2, 3))]), "object[0]/bndbox/ymin", "empty"),
        (voc_xml(objects=["<object><name>cat</name></object>"]), "object[0]/bndbox", "missing"),
        (voc_xml(width="abc"), "size/width", "'abc' is not a number"),
        (voc_xml(width=0), "size/width", "0 is not a positive whole number"),
        (voc_xml(height=2.5), "size/height", "2.5 is not a positive whole number"),
        (sized("<height>80</height>"), "size/width", "missing"),
        (sized(WH + "<depth>0</depth>"), "size/depth", "0 is not a positive whole number"),
        (sized(WH + "<depth/>"), "size/depth", "empty"),
        ("<annotation><filename>a.jpg</filename></annotation>", "size", "missing"),
        (sized(WH, "<segmented>2</segmented>"), "segmented", "2 is not 0 or 1"),
        (sized(WH, "<segmented>yes</segmented>"), "segmented", "'yes' is not a number"),
        (
            voc_xml(filename="../outside.jpg"),
            "filename",
            "'../outside.jpg' is not a plain file name inside JPEGImages/",
        ),
        plain("/etc/passwd"),
        plain("sub\\x.jpg"),
        plain("c:x.jpg"),
        plain(".."),
        plain("."),
        (voc_xml(filename=""), "filename", "empty"),
        (
            "<annotation><size><width>1</width><height>1</height></size></annotation>",
            "filename",
            "missing",
        ),
        ("<other/>", "annotation", "root element is <other>"),
        (
            voc_xml(objects=[obj(inner="<difficult>2</difficult>")]),
            "object[0]/difficult",
            "2 is not 0 or 1",
        ),
        (
            voc_xml(objects=[obj(inner="<truncated>-1</truncated>")]),
            "object[0]/truncated",
            "-1 is not 0 or 1",
        ),
        (
            voc_xml(objects=[obj(), obj(inner="<occluded>0.5</occluded>")]),
            "object[1]/occluded",
            "0.5 is not 0 or 1",
        ),
    ],
)
def test_bad_annotations_name_file_and_field(tmp_path, xml, field, message):
    error = error_of(tmp_path, xml)
    assert (error.file, error.field) == (str(tmp_path / "x.xml"), field)
    if message.endswith(": "):  # the parser's own words follow
        assert error.message.startswith(message)
    else:
        assert error.message == message
    assert str(error) == f"{tmp_path / 'x.xml'}: {field}: {error.message}"


def test_depth_is_three_when_missing_and_names_may_hold_any_other_character(tmp_path):
    image, _ = parse(tmp_path, sized(WH))
    assert image["depth"] == 3
    image, _ = parse(tmp_path, sized(WH + "<depth>1</depth>"))
    assert image["depth"] == 1
    image, _ = parse(tmp_path, voc_xml(filename="X-ray .jpg.XX"))
    assert image["filename"] == "X-ray .jpg.XX"


def test_a_file_that_cannot_be_read_is_named(tmp_path):
    missing = tmp_path / "missing.xml"
    with pytest.raises(AnnotationError) as raised:
        parse_annotation(missing, IDS)
    assert str(raised.value) == f"{missing}: xml: cannot read (No such file or directory)"
    folder = tmp_path / "folder.xml"
    folder.mkdir()
    with pytest.raises(AnnotationError) as raised:
        parse_annotation(folder, IDS)
    assert str(raised.value) == f"{folder}: xml: cannot read (Is a directory)"


def test_an_annotation_of_up_to_one_mebibyte_is_read(tmp_path):
    xml = voc_xml()
    path = tmp_path / "x.xml"
    path.write_text(xml + " " * ((1 << 20) - len(xml)))  # exactly 1 MiB: still read
    assert parse_annotation(path, IDS)[0]["width"] == 100
    path.write_text(xml + " " * ((1 << 20) + 1 - len(xml)))
    with pytest.raises(AnnotationError) as raised:
        parse_annotation(path, IDS)
    assert raised.value.message == ("1,048,577 bytes: larger than 1,048,576, not a VOC annotation")


def test_entity_expansion_is_refused(tmp_path):
    bomb = (
        '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
        '<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]>'
        "<annotation><filename>&lol2;</filename></annotation>"
    )
    error = error_of(tmp_path, bomb)
    assert error.field == "xml" and error.message.startswith("refused unsafe XML (")


def test_external_entity_is_refused(tmp_path):
    xxe = (
        '<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        "<annotation><filename>&x;</filename></annotation>"
    )
    error = error_of(tmp_path, xxe)
    assert error.field == "xml" and error.message.startswith("refused unsafe XML (")


def test_read_voc_rows_and_roles(voc_folder):
    voc_folder.add("a", voc_xml("a.jpg", objects=[obj("cat"), obj("dog", (1, 1, 9, 9))]))
    voc_folder.add("b", voc_xml("b.jpg", objects=[obj("person")]))
    voc_folder.split("mytrain", ["a"])
    voc_folder.split("myval", ["b"])
    rows = read_voc(voc_folder.root, {"train": "mytrain", "val": "myval"}, CLASSES, progress=False)
    assert [(i["image_id"], i["split"], i["path"], i["n_objects"]) for i in rows.images] == [
        ("a", "train", "JPEGImages/a.jpg", 2),
        ("b", "val", "JPEGImages/b.jpg", 1),
    ]
    assert [(o["image_id"], o["class_id"]) for o in rows.objects] == [("a", 0), ("a", 1), ("b", 2)]
    assert rows.skipped == []


@pytest.mark.parametrize(
    ("setup", "words"),
    [
        (
            lambda f: f.add("a", voc_xml(), size=(101, 80)),
            "says 100x80 but JPEGImages/a.jpg is 101x80",
        ),
        (lambda f: f.add("a", None), "annotation listed in the split does not exist"),
        (lambda f: f.add("a", voc_xml(), image=False), "does not exist"),
        (lambda f: f.add("a", voc_xml(filename="zzz.jpg")), "zzz.jpg does not exist"),
    ],
)
def test_image_checks_raise_or_skip(voc_folder, setup, words):
    setup(voc_folder)
    voc_folder.add("ok", voc_xml("ok.jpg"))
    voc_folder.split("train", ["a", "ok"])
    voc_folder.split("val", ["ok2"])
    voc_folder.add("ok2", voc_xml("ok2.jpg"))
    with pytest.raises(AnnotationError, match=words):
        read_voc(voc_folder.root, {"train": "train"}, CLASSES, progress=False)
    rows = read_voc(voc_folder.root, {"train": "train", "val": "val"}, CLASSES, "skip", False)
    assert [i["image_id"] for i in rows.images] == ["ok", "ok2"]
    assert len(rows.skipped) == 1
    assert rows.skipped[0]["image_id"] == "a" and rows.skipped[0]["split"] == "train"
    assert words in rows.skipped[0]["reason"]


def test_corrupt_image_is_named(voc_folder):
    voc_folder.add("a", voc_xml(), image=False)
    (voc_folder.root / "JPEGImages" / "a.jpg").write_bytes(b"not a jpeg at all")
    voc_folder.split("train", ["a"])
    with pytest.raises(AnnotationError, match=r"a\.jpg: image: not a readable image"):
        read_voc(voc_folder.root, {"train": "train"}, CLASSES, progress=False)


def test_split_ids_cannot_leave_the_folder(voc_folder):
    voc_folder.split("train", ["../../etc/passwd"])
    with pytest.raises(AnnotationError, match="not a plain image id"):
        read_voc(voc_folder.root, {"train": "train"}, CLASSES, progress=False)


def test_dataset_level_errors(voc_folder, tmp_path):
    with pytest.raises(DatasetError, match="no Annotations"):
        read_voc(tmp_path / "nowhere", {"train": "train"}, CLASSES, progress=False)
    voc_folder.split("train", ["a", "b"])
    voc_folder.split("val", ["b"])
    with pytest.raises(
        DatasetError, match=r"nope\.txt: split list not found; lists there: train, val"
    ):
        read_voc(voc_folder.root, {"train": "train", "val": "nope"}, CLASSES, progress=False)
    with pytest.raises(DatasetError, match="share 1 images"):
        read_voc(voc_folder.root, {"train": "train", "val": "val"}, CLASSES, progress=False)
    voc_folder.split("four", ["d", "c", "b", "a"])
    with pytest.raises(DatasetError) as raised:  # the common ids named in order
        read_voc(voc_folder.root, {"train": "train", "val": "four"}, CLASSES, progress=False)
    assert str(raised.value) == (
        "splits 'train' and 'four' share 2 images (e.g. a, b); pick disjoint lists"
    )
    voc_folder.split("five", ["e", "d", "c", "b", "a"])
    with pytest.raises(DatasetError) as raised:  # the first three of them
        read_voc(voc_folder.root, {"train": "four", "val": "five"}, CLASSES, progress=False)
    assert str(raised.value) == (
        "splits 'four' and 'five' share 4 images (e.g. a, b, c); pick disjoint lists"
    )
    voc_folder.split("dup", ["a", "a"])
    with pytest.raises(DatasetError, match="listed twice: a"):
        read_voc(voc_folder.root, {"train": "dup"}, CLASSES, progress=False)


def test_decompression_bomb_guard_is_kept(voc_folder, monkeypatch):
    from PIL import Image

    voc_folder.add("a", voc_xml())  # a 100x80 image
    voc_folder.split("train", ["a"])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 8,000 pixels > 2 x limit: refused
    with pytest.raises(AnnotationError, match=r"a\.jpg: image: not a readable image"):
        read_voc(voc_folder.root, {"train": "train"}, CLASSES, progress=False)


@pytest.mark.parametrize(
    ("setup", "where", "field", "message"),
    [
        (
            lambda f: f.split("train", ["a/b"]),
            "ImageSets/Main",
            "id",
            "'a/b' is not a plain image id",
        ),
        (
            lambda f: f.split("train", ["a"]),
            "Annotations/a.xml",
            "file",
            "annotation listed in the split does not exist",
        ),
        (
            lambda f: (f.add("a", voc_xml(), size=(101, 80)), f.split("train", ["a"])),
            "Annotations/a.xml",
            "size",
            "says 100x80 but JPEGImages/a.jpg is 101x80",
        ),
        (
            lambda f: (f.add("a", voc_xml(), image=False), f.split("train", ["a"])),
            "Annotations/a.xml",
            "filename",
            "image {root}/JPEGImages/a.jpg does not exist",
        ),
    ],
)
def test_image_errors_name_the_file_and_field_in_full(voc_folder, setup, where, field, message):
    """The whole one-line message: `<file>: <field>: <what>`, the file inside the dataset."""
    setup(voc_folder)
    with pytest.raises(AnnotationError) as raised:
        read_voc(voc_folder.root, {"train": "train"}, CLASSES, progress=False)
    error = raised.value
    assert (error.file, error.field) == (str(voc_folder.root / where), field)
    message = message.format(root=voc_folder.root)
    assert str(error) == f"{voc_folder.root / where}: {field}: {message}"


def test_split_lists_by_hand(voc_folder):
    lists = voc_folder.root / "ImageSets" / "Main"
    with pytest.raises(DatasetError) as raised:  # no list at all: nothing to suggest
        read_voc(voc_folder.root, {"train": "train"}, CLASSES, progress=False)
    assert str(raised.value) == f"{lists / 'train.txt'}: split list not found"
    voc_folder.split("cat_train", ["a"])  # a per-class list is not offered
    voc_folder.split("dup", list("abcdefab" + "cdef"))  # six ids twice: the first five named
    with pytest.raises(DatasetError) as raised:
        read_voc(voc_folder.root, {"train": "nope"}, CLASSES, progress=False)
    assert str(raised.value) == f"{lists / 'nope.txt'}: split list not found; lists there: dup"
    with pytest.raises(DatasetError) as raised:
        read_voc(voc_folder.root, {"train": "dup"}, CLASSES, progress=False)
    assert str(raised.value) == f"{lists / 'dup.txt'}: ids listed twice: a, b, c, d, e"
    (lists / "bytes.txt").write_bytes(b"ok\n\xff\xfe\n")  # not UTF-8: read, and refused by name
    voc_folder.add("ok", voc_xml("ok.jpg"))
    with pytest.raises(AnnotationError, match="is not a plain image id"):
        read_voc(voc_folder.root, {"train": "bytes"}, CLASSES, progress=False)


def test_reading_shows_a_progress_bar_unless_asked_not_to(voc_folder, capsys):
    voc_folder.add("a", voc_xml("a.jpg", objects=[obj("cat")]))
    voc_folder.add("b", voc_xml("b.jpg", objects=[obj("dog")]))
    voc_folder.split("train", ["a", "b"])
    read_voc(voc_folder.root, {"train": "train"}, CLASSES)  # progress by default
    shown = capsys.readouterr().err
    assert "parse annotations: 100%|" in shown and "| 2/2 [" in shown and "file/s]" in shown
    read_voc(voc_folder.root, {"train": "train"}, CLASSES, progress=False)
    assert capsys.readouterr().err == ""
    with pytest.raises(ValueError) as raised:
        read_voc(voc_folder.root, {"train": "train"}, CLASSES, on_error="ignore")
    assert str(raised.value) == "on_error must be 'raise' or 'skip', got 'ignore'"
