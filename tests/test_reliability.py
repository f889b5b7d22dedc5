"""Hostile and malformed input across the pipeline (docs/reliability.md lists every case).

Each case ends in a clear error naming the file and field (or a counted skip), never a hang, a
traceback from inside a library or a silently wrong number. The faults (killed runs, disk full,
concurrent runs, determinism) are in test_faults.py.
"""

from __future__ import annotations

import errno
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import VocFolder, voc_xml
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from pipeline_lib.base.errors import PipelineError
from pipeline_lib.base.params import ParamsError, load_params
from pipeline_lib.boxes.geometry import ImageSpec
from pipeline_lib.data.voc import MAX_ANNOTATION_BYTES, AnnotationError, parse_annotation, read_voc
from pipeline_lib.evaluation.inference import open_photo
from pipeline_lib.features import extraction as features_module
from pipeline_lib.features.backbones import load_backbone
from pipeline_lib.features.extraction import ExtractSettings, extract_features
from pipeline_lib.features.featurefiles import read_features
from pipeline_lib.features.images import ImageError, ImageFolder, load_rgb

CLASSES = ["cat", "dog"]
IDS = {name: i for i, name in enumerate(CLASSES)}


def obj(box=(10, 20, 50, 60), name="cat") -> str:
    xmin, ymin, xmax, ymax = box
    return (
        f"<object><name>{name}</name><bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin>"
        f"<xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>"
    )


def parse_error(tmp_path: Path, content: bytes) -> AnnotationError:
    path = tmp_path / "x.xml"
    path.write_bytes(content)
    with pytest.raises(AnnotationError) as info:
        parse_annotation(path, IDS)
    assert str(path) in str(info.value)
    return info.value


# --- XML -------------------------------------------------------------------------------------


def test_a_huge_annotation_is_refused_without_parsing(tmp_path):
    padding = b"<!--" + b"x" * MAX_ANNOTATION_BYTES + b"-->"
    error = parse_error(tmp_path, padding + voc_xml().encode())
    assert error.field == "xml" and "not a VOC annotation" in error.message


@pytest.mark.parametrize(
    ("content", "words"),
    [
        # Latin-1 bytes in a file that declares (or defaults to) UTF-8
        (voc_xml(extra="<pose>Fr\xe9d\xe9ric</pose>").encode("latin-1"), "malformed XML"),
        (
            b'<?xml version="1.0" encoding="utf-8"?>'
            + "<annotation>\xe9</annotation>".encode("latin-1"),
            "malformed XML",
        ),
        (b'<?xml version="1.0" encoding="klingon"?><annotation/>', "malformed XML"),
        (b"\x00\x01\x02binary", "malformed XML"),
        (b"", "malformed XML"),
    ],
)
def test_wrong_encodings_are_named(tmp_path, content, words):
    error = parse_error(tmp_path, content)
    assert error.field == "xml" and words in error.message


def test_declared_encodings_and_a_bom_are_honoured(tmp_path):
    path = tmp_path / "x.xml"
    xml = voc_xml(objects=[obj()]).replace("<annotation>", "<annotation><source>Fréd</source>")
    path.write_bytes(b'<?xml version="1.0" encoding="ISO-8859-1"?>' + xml.encode("latin-1"))
    assert parse_annotation(path, IDS)[1][0]["class_name"] == "cat"
    path.write_bytes(voc_xml(objects=[obj()]).encode("utf-16"))  # with its BOM
    assert parse_annotation(path, IDS)[1][0]["xmax"] == 50
    path.write_bytes(voc_xml(objects=[obj()]).encode("utf-16-le"))  # no BOM: detected from "<"
    assert parse_annotation(path, IDS)[1][0]["xmax"] == 50


@pytest.mark.parametrize(
    ("box", "field"),
    [
        ((10, 20, 1e30, 60), "object[0]/bndbox"),  # huge: outside the image
        ((10, 20, "inf", 60), "object[0]/bndbox/xmax"),
        ((10, "-inf", 50, 60), "object[0]/bndbox/ymin"),
        ((10, 20, 50, "NaN"), "object[0]/bndbox/ymax"),
        ((-5, -5, -1, -1), "object[0]/bndbox"),
        ((10, 20, "1e400", 60), "object[0]/bndbox/xmax"),  # overflows to inf
    ],
)
def test_bad_coordinates_are_named(tmp_path, box, field):
    error = parse_error(tmp_path, voc_xml(objects=[obj(box)]).encode())
    assert error.field == field


def test_an_image_without_objects_is_kept_and_counted(voc_folder):
    voc_folder.add("empty", voc_xml("empty.jpg", objects=()))
    voc_folder.add("one", voc_xml("one.jpg"))
    voc_folder.split("train", ["empty", "one"])
    rows = read_voc(voc_folder.root, {"train": "train"}, CLASSES, progress=False)
    assert [(i["image_id"], i["n_objects"]) for i in rows.images] == [("empty", 0), ("one", 1)]
    assert len(rows.objects) == 1


# --- paths -----------------------------------------------------------------------------------


def test_files_linked_from_anywhere_are_the_users_choice(voc_folder, tmp_path):
    # DVC's symlink cache (and a folder merging two datasets) links every file to elsewhere;
    # a hardlink or a reflink is an ordinary file. All are read.
    outside = tmp_path / "cache"
    outside.mkdir()
    Image.new("RGB", (100, 80)).save(outside / "64261e", format="JPEG")
    (outside / "9f1b2c").write_text(voc_xml("b.jpg"))
    voc_folder.add("a", voc_xml("a.jpg"), image=False)
    (voc_folder.root / "JPEGImages" / "a.jpg").symlink_to(outside / "64261e")
    voc_folder.add("b", None)
    (voc_folder.root / "Annotations" / "b.xml").symlink_to(outside / "9f1b2c")
    voc_folder.add("c", voc_xml("c.jpg"), image=False)
    (voc_folder.root / "JPEGImages" / "c.jpg").hardlink_to(outside / "64261e")
    voc_folder.split("train", ["a", "b", "c"])
    rows = read_voc(voc_folder.root, {"train": "train"}, CLASSES, progress=False)
    assert [i["image_id"] for i in rows.images] == ["a", "b", "c"]
    assert [i["path"] for i in rows.images] == [f"JPEGImages/{x}.jpg" for x in "abc"]


@pytest.mark.parametrize("name", ["../secret.jpg", "/tmp/secret.jpg", "..", "sub/a.jpg"])
def test_a_filename_in_the_annotation_text_cannot_leave_jpegimages(voc_folder, tmp_path, name):
    Image.new("RGB", (100, 80)).save(voc_folder.root / "secret.jpg")  # exists, one level up
    voc_folder.add("a", voc_xml(name), image=False)
    voc_folder.split("train", ["a"])
    with pytest.raises(AnnotationError, match="not a plain file name inside JPEGImages") as info:
        read_voc(voc_folder.root, {"train": "train"}, CLASSES, progress=False)
    assert info.value.field == "filename" and info.value.file.endswith("a.xml")


def test_a_linked_folder_is_fine(tmp_path):
    disk = tmp_path / "other_disk" / "JPEGImages"
    disk.mkdir(parents=True)
    folder = VocFolder(tmp_path / "VOCdevkit" / "VOC2007")
    folder.root.joinpath("JPEGImages").rmdir()
    folder.root.joinpath("JPEGImages").symlink_to(disk, target_is_directory=True)
    folder.add("a", voc_xml("a.jpg"))
    folder.split("train", ["a"])
    assert len(read_voc(folder.root, {"train": "train"}, CLASSES, progress=False).images) == 1


def test_unicode_ids_work_and_ids_with_spaces_are_named(voc_folder):
    voc_folder.add("ünïcødé_01", voc_xml("ünïcødé_01.jpg"))
    voc_folder.add("猫-2", voc_xml("猫-2.jpg"))
    voc_folder.split("train", ["ünïcødé_01", "猫-2"])
    rows = read_voc(voc_folder.root, {"train": "train"}, CLASSES, progress=False)
    assert [i["path"] for i in rows.images] == ["JPEGImages/ünïcødé_01.jpg", "JPEGImages/猫-2.jpg"]
    for bad in ("my photo", "a/../../b", "..", "_hidden", "x\ty"):
        voc_folder.split("val", [bad])
        with pytest.raises(AnnotationError, match="not a plain image id"):
            read_voc(voc_folder.root, {"val": "val"}, CLASSES, progress=False)


# --- images ----------------------------------------------------------------------------------


def giant_jpeg(path: Path, width: int = 20_000, height: int = 20_000) -> Path:
    """A JPEG whose header says width x height (the data is an 8x8 image's): costs nothing to
    create, and a decoder that trusted the header would allocate 1.2 GB."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")  # FF C0, length (2), precision (1), height (2), width (2)
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    path.write_bytes(bytes(data))
    return path


def test_a_20000_pixel_square_image_is_refused_everywhere(voc_folder, tmp_path):
    giant = giant_jpeg(tmp_path / "giant.jpg")
    with pytest.MonkeyPatch.context() as patch:  # the header really says so
        patch.setattr(Image, "MAX_IMAGE_PIXELS", None)
        with Image.open(giant) as image:
            assert image.size == (20_000, 20_000)
    with pytest.raises(ImageError, match="giant.jpg: image: cannot decode.*decompression bomb"):
        load_rgb(giant)
    with pytest.raises(ImageError, match="giant.jpg: cannot decode.*decompression bomb"):
        open_photo(giant)
    voc_folder.add("g", voc_xml("g.jpg", width=20_000, height=20_000), image=False)
    shutil.copy(giant, voc_folder.root / "JPEGImages" / "g.jpg")
    voc_folder.split("train", ["g"])
    with pytest.raises(AnnotationError, match="g.jpg: image: not a readable image.*bomb"):
        read_voc(voc_folder.root, {"train": "train"}, CLASSES, progress=False)


def test_a_one_pixel_image_goes_through(voc_folder):
    voc_folder.add(
        "p", voc_xml("p.jpg", width=1, height=1, objects=[obj((0, 0, 1, 1))]), size=(1, 1)
    )
    voc_folder.split("train", ["p"])
    rows = read_voc(voc_folder.root, {"train": "train"}, CLASSES, progress=False)
    assert rows.objects[0]["xmax"] == 1
    for mode in ("shrink", "crop"):
        _, tensor, error = ImageFolder([voc_folder.root / "JPEGImages" / "p.jpg"], mode, 32)[0]
        assert error is None and tensor.shape == (3, 32, 32)


def test_multi_frame_files_use_their_first_frame(tmp_path):
    first, second = Image.new("RGB", (40, 30), (255, 0, 0)), Image.new("RGB", (40, 30), (0, 0, 255))
    mpo = tmp_path / "camera.jpg"  # a multi-picture JPEG, as some cameras write
    first.save(mpo, format="MPO", save_all=True, append_images=[second])
    gif = tmp_path / "animated.gif"
    first.save(gif, save_all=True, append_images=[second], duration=100, loop=0)
    with Image.open(mpo) as image:
        assert image.format == "MPO" and image.n_frames == 2
    assert load_rgb(mpo).getpixel((20, 15))[0] > 200  # red: the first frame
    for path in (mpo, gif):
        assert open_photo(path).getpixel((20, 15))[0] > 200


def test_an_animated_gif_named_jpg_is_refused_for_training(tmp_path):
    path = tmp_path / "a.jpg"
    Image.new("RGB", (8, 8)).save(
        path, format="GIF", save_all=True, append_images=[Image.new("RGB", (8, 8))]
    )
    with pytest.raises(ImageError, match="a GIF file named .jpg"):
        load_rgb(path)


# --- params ----------------------------------------------------------------------------------


def leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def wrong_type(value):
    """A value of another type than `value` (what `-S key=...` typos produce)."""
    if isinstance(value, str):
        return 12345
    if isinstance(value, list):
        return "not-a-list"
    return "not-a-number" if not isinstance(value, bool) else "maybe"


def test_every_param_with_a_wrong_type_is_named(tmp_path, raw_params):
    checked = 0
    for key, value in leaves(raw_params):
        tree = yaml.safe_load(yaml.safe_dump(raw_params))
        *groups, last = key.split(".")
        node = tree
        for group in groups:
            node = node[group]
        node[last] = wrong_type(value)
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(tree))
        with pytest.raises(ParamsError) as info:
            load_params(path)
        assert f"params.yaml: {key}" in str(info.value), (key, str(info.value))
        checked += 1
    assert checked >= 50  # every leaf of params.yaml


# --- model and feature files -----------------------------------------------------------------


def test_bad_feature_files_are_refused_with_their_name(tmp_path):
    good = tmp_path / "good.safetensors"
    resnet = load_backbone("resnet18", "layer4", "random")
    Image.new("RGB", (40, 40), (9, 90, 200)).save(tmp_path / "i.jpg")
    extract_features(
        resnet,
        dict(zip(["i"], [tmp_path / "i.jpg"], strict=True)),
        good,
        ImageSpec("shrink", 64),
        ExtractSettings(workers=0),
        progress=None,
    )
    assert read_features(good).image_ids == ["i"]
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:200])
    pickled = tmp_path / "pickled.safetensors"
    torch.save({"features": torch.zeros(1, 2)}, pickled)  # never unpickled
    foreign = tmp_path / "foreign.safetensors"
    save_file({"features": torch.zeros(1, 2)}, str(foreign))
    for path, words in (
        (truncated, "not a readable feature file"),
        (pickled, "not a readable feature file"),
        (foreign, "not features of this pipeline"),
    ):
        with pytest.raises(PipelineError, match=words) as info:
            read_features(path)
        assert str(path) in str(info.value)


def test_features_of_another_backbone_are_refused_by_evaluate(trained, tmp_path, monkeypatch):
    from stages import evaluate

    work = tmp_path / "work"
    for sub in ("data/prepared", "data/features", "models", "data/synthetic"):
        shutil.copytree(trained / sub, work / sub)
    shutil.copy(trained / "params.yaml", work)
    val = work / "data/features/val.safetensors"
    stored = read_features(val)
    backbone = {**stored.metadata["backbone"], "name": "resnet18"}
    other = {
        **stored.metadata,
        "image_ids": json.dumps(stored.image_ids),
        "backbone": json.dumps(backbone),
    }
    save_file({"features": stored.features}, str(val), metadata=other)
    monkeypatch.chdir(work)
    result = CliRunner().invoke(evaluate.app, ["multi"])
    assert result.exit_code == 1
    assert "comes from resnet18 but models/multi.safetensors was trained on efficientnet_lite0" in (
        result.output
    )
    assert not (work / "reports").exists()  # nothing written


def test_a_full_disk_while_writing_features_keeps_nothing(tmp_path, monkeypatch):
    """ENOSPC from the writer (a patched `open`: no small tmpfs needed)."""
    resnet = load_backbone("resnet18", "layer4", "random")
    paths = []
    for i in range(4):
        Image.new("RGB", (40, 40), (i * 60, 90, 200)).save(tmp_path / f"{i}.jpg")
        paths.append(tmp_path / f"{i}.jpg")
    real_open = open

    class FullDisk(io.FileIO):
        written = 0

        def write(self, data):
            FullDisk.written += len(data)
            if FullDisk.written > 10_000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(data)

    def patched_open(file, mode="r", *args, **kwargs):
        if "w" in mode and str(file).endswith(".tmp"):
            return FullDisk(file, "w")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(features_module, "open", patched_open, raising=False)
    out = tmp_path / "features" / "train.safetensors"
    with pytest.raises(PipelineError, match="cannot write features \\(No space left on device\\)"):
        extract_features(
            resnet,
            dict(zip(list("abcd"), paths, strict=True)),
            out,
            ImageSpec("shrink", 64),
            ExtractSettings(batch_size=1, workers=0),
            progress=None,
        )
    assert list(out.parent.iterdir()) == []  # no partial file, no temporary left
