"""`python -m stages.predict`: a model file on anyone's images, equal to what evaluate computes."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torchvision.transforms.v2 import functional as F
from typer.testing import CliRunner

from pipeline_lib.boxes.detection import Filtering, grid_detections, single_detections
from pipeline_lib.boxes.geometry import ImageSpec, encoded_to_image
from pipeline_lib.data.tables import read_prepared
from pipeline_lib.evaluation.inference import cell_rectangles, open_photo, read_photo
from pipeline_lib.features.featurefiles import read_features
from pipeline_lib.features.images import ImageError, load_image_tensor
from pipeline_lib.models.checkpoints import load_checkpoint, save_checkpoint
from pipeline_lib.models.modelcard import GridSpec, ModelCard
from pipeline_lib.training.loop import predict as run_head
from stages import predict

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def val_paths(folder: Path) -> list[Path]:
    prepared = read_prepared(folder / "data/prepared")
    val = prepared.images[prepared.images["split"] == "val"]
    return [folder / prepared.info["dataset_dir"] / p for p in val["path"]]


def run_predict(args: list[str]):
    return runner.invoke(predict.app, [str(a) for a in args])


def test_grid_predictions_equal_the_evaluate_stage(trained, tmp_path):
    """The same val images and model: predict from the photos, evaluate from the cached features."""
    paths = val_paths(trained)
    out = tmp_path / "out"
    result = run_predict(
        [
            *paths,
            "--model",
            trained / "models/multi.safetensors",
            "--out",
            out,
            "--score",
            0.001,  # the tiny set's 2-epoch model scores low
            "--format",
            "json",
            "--batch-size",
            8,
            "--no-progress",
        ]
    )
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "detections.json").read_text())

    # What stages/evaluate.py multi does, from data/features/val.safetensors.
    checkpoint = load_checkpoint(trained / "models/multi.safetensors")
    features = read_features(trained / "data/features/val.safetensors")
    prepared = read_prepared(trained / "data/prepared")
    sizes = prepared.images.set_index("image_id").loc[features.image_ids]
    image_sizes = list(zip(sizes["width"], sizes["height"], strict=True))
    assert any(w != h for w, h in image_sizes)  # non-square photos among them
    outputs = run_head(checkpoint.head, features.features)
    assert checkpoint.card.image == ImageSpec("shrink", 448)
    # predict runs the backbone as extract did (the precision recorded: test_inference)
    assert checkpoint.card.backbone == features.metadata["backbone"]
    expected = checkpoint.head.detections(
        outputs, image_sizes, checkpoint.card.image, Filtering(0.001, 0.5, 100)
    )
    by_id = {Path(p).stem: p for p in map(str, paths)}
    total = 0
    for image_id, found in zip(features.image_ids, expected, strict=True):
        mine = [r for r in rows if r["image"] == by_id[image_id]]
        assert len(mine) == len(found), image_id
        for row, box, score, label in zip(
            mine, found.boxes.tolist(), found.scores.tolist(), found.labels.tolist(), strict=True
        ):
            assert row["class"] == checkpoint.classes[label]
            assert row["score"] == pytest.approx(score, abs=1e-4)
            got = [row[c] for c in ("xmin", "ymin", "xmax", "ymax")]
            assert got == pytest.approx(box, abs=0.02)  # the table rounds to 0.01 px
        total += len(mine)
    assert total == len(rows) > 0
    for path in paths:  # one annotated PNG per image, at the photo's own size
        with Image.open(path) as original, Image.open(out / f"{path.stem}.png") as drawn:
            assert drawn.size == original.size and drawn.format == "PNG"
    assert re.search(r"5 images, \d+ detections, [\d.]+ images/s", result.output)


def test_single_predictions_equal_the_evaluate_stage(trained, tmp_path):
    paths = val_paths(trained)
    model = trained / "models/single.safetensors"
    result = run_predict([*paths, "--model", model, "--out", tmp_path, "--no-progress"])
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(tmp_path / "detections.parquet")
    assert list(table.columns) == ["image", "class", "score", "xmin", "ymin", "xmax", "ymax"]
    assert len(table) == len(paths)  # one box per image, whatever its score

    checkpoint = load_checkpoint(model)
    features = read_features(trained / "data/features/val.safetensors")
    prepared = read_prepared(trained / "data/prepared")
    sizes = prepared.images.set_index("image_id").loc[features.image_ids]
    pred_boxes, logits = run_head(checkpoint.head, features.features)
    table = table.set_index(table["image"].map(lambda p: Path(p).stem)).loc[features.image_ids]
    for n, (w, h) in enumerate(zip(sizes["width"], sizes["height"], strict=True)):
        box = encoded_to_image(pred_boxes[n : n + 1], int(w), int(h), "shrink", 224)[0]
        row = table.iloc[n]
        assert row["class"] == checkpoint.classes[int(logits[n].argmax())]
        assert [row.xmin, row.ymin, row.xmax, row.ymax] == pytest.approx(box.tolist(), abs=0.02)
        assert row.score == pytest.approx(float(torch.softmax(logits[n], 0).max()), abs=1e-4)


def grid_outputs(cells: int, classes: int, i: int, j: int, box, label: int, obj: float):
    """Head outputs where only cell (i, j) holds an object: (1, 4, S, S) boxes, logits."""
    boxes = torch.zeros(1, 4, cells, cells)
    boxes[0, :, i, j] = torch.tensor(box)
    logits = torch.full((1, classes + 1, cells, cells), -10.0)
    logits[0, label, i, j] = 5.0
    logits[0, -1, i, j] = obj
    return boxes, logits


def test_boxes_map_back_to_a_non_square_image_by_hand():
    # Cell row 3, column 5 of 7; centre offsets (0.5, 0.5); w 0.2 and h 0.4 of the network input.
    boxes, logits = grid_outputs(7, 3, 3, 5, [0.5, 0.5, 0.2, 0.4], label=1, obj=5.0)
    score = 1 / (1 + math.exp(-5)) / (1 + 2 * math.exp(-15))  # sigmoid(obj) x softmax of class 1
    # shrink, 400 x 200: centre (5.5/7 * 400, 3.5/7 * 200) = (314.29, 100), size 80 x 80
    (found,) = grid_detections(
        boxes, logits, [(400, 200)], ImageSpec("shrink", 224), Filtering(0.2, 0.5, 100)
    )
    assert found.labels.tolist() == [1] and found.scores.tolist() == pytest.approx([score])
    assert found.boxes[0].tolist() == pytest.approx([274.2857, 60, 354.2857, 140], abs=1e-3)
    # crop 224 of 400 x 300: window from (88, 38); centre (176 + 88, 112 + 38), size 44.8 x 89.6
    (found,) = grid_detections(
        boxes, logits, [(400, 300)], ImageSpec("crop", 224), Filtering(0.2, 0.5, 100)
    )
    assert found.boxes[0].tolist() == pytest.approx([241.6, 105.2, 286.4, 194.8], abs=1e-3)
    # below the score threshold: nothing
    boxes, logits = grid_outputs(7, 3, 3, 5, [0.5, 0.5, 0.2, 0.4], label=1, obj=-5.0)
    assert (
        len(
            grid_detections(
                boxes, logits, [(400, 200)], ImageSpec("shrink", 224), Filtering(0.2, 0.5, 100)
            )[0]
        )
        == 0
    )

    # single head: encoded (0.25, 0.5, 0.5, 0.5) of a 300 x 100 photo -> (0, 25, 150, 75)
    logits = torch.tensor([[0.0, math.log(3.0)]])  # softmax (0.25, 0.75)
    (one,) = single_detections(
        torch.tensor([[0.25, 0.5, 0.5, 0.5]]), logits, [(300, 100)], ImageSpec("shrink", 224)
    )
    assert one.boxes[0].tolist() == pytest.approx([0, 25, 150, 75])
    assert one.labels.tolist() == [1] and one.scores.tolist() == pytest.approx([0.75])
    # a box overhanging the photo is clipped to it: centre x 30, width 150 -> (-45, 105) -> (0, 105)
    (one,) = single_detections(
        torch.tensor([[0.1, 0.5, 0.5, 0.5]]), logits, [(300, 100)], ImageSpec("shrink", 224)
    )
    assert one.boxes[0].tolist() == pytest.approx([0, 25, 105, 75])


def card(mode: str) -> ModelCard:
    """A 2 x 2 grid model's card at 224 pixels."""
    return ModelCard(
        "multi", {}, ["a"], [8, 7, 7], "float16", {}, ImageSpec(mode, 224), grid=GridSpec(2)
    )


def test_predict_feeds_the_backbone_what_extract_feeds_it(tmp_path):
    """A large photo (decoded at a lower scale by extract under shrink) and a small one: predict's
    backbone input is extract's, bit for bit, while it draws on the photo at full size."""
    torch.manual_seed(3)
    sizes = {"large.jpg": (900, 700), "small.jpg": (300, 200)}
    sizes |= {"twice.jpg": (600, 448), "between.jpg": (900, 500)}  # 2x 224 exactly; 2x .. 3x
    for name, size in sizes.items():
        path = tmp_path / name
        pixels = (torch.rand(3, size[1] // 10, size[0] // 10) * 255).to(torch.uint8)
        F.to_pil_image(F.resize(pixels, [size[1], size[0]])).save(path, quality=85)
        for spec in (ImageSpec("shrink", 224), ImageSpec("crop", 224)):
            photo = read_photo(path, spec)
            assert photo.image.size == size and photo.path == path
            assert torch.equal(photo.pixels, load_image_tensor(path, spec.mode, spec.size))


def test_photos_that_cannot_be_read_are_named_with_the_reason(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "folder.jpg").mkdir()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(tmp_path / "cut.jpg")
    data = (tmp_path / "cut.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    expected = {
        "missing.jpg": "no such file",
        "empty.jpg": "not an image (an empty file)",
        "text.png": "not an image (PIL cannot identify it)",
        "folder.jpg": "a folder, not an image",
        "cut.jpg": "cannot decode (",
    }
    for name, reason in expected.items():
        with pytest.raises(ImageError) as raised:
            open_photo(tmp_path / name)
        assert str(raised.value).startswith(f"{tmp_path / name}: {reason}"), str(raised.value)
    Image.new("L", (30, 20), 128).save(tmp_path / "grey.png")  # any mode comes back RGB
    grey = open_photo(tmp_path / "grey.png")
    assert grey.mode == "RGB" and grey.size == (30, 20) and grey.getpixel((0, 0)) == (128,) * 3


def test_cell_rectangles_by_hand():
    shrink = cell_rectangles(card("shrink"), 100, 50)
    expected = [[0, 0, 50, 25], [50, 0, 100, 25], [0, 25, 50, 50], [50, 25, 100, 50]]
    assert torch.allclose(shrink, torch.tensor(expected, dtype=shrink.dtype))
    crop = cell_rectangles(card("crop"), 300, 300)
    assert crop[0].tolist() == pytest.approx([38, 38, 150, 150])  # window from round(76 / 2)
    assert crop[3].tolist() == pytest.approx([150, 150, 262, 262])


def test_folders_any_size_and_colour_mode_with_the_grid(trained, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("L", (333, 111), 128).save(photos / "grey.jpg")
    Image.new("CMYK", (120, 250), (0, 50, 100, 0)).save(photos / "cmyk.jpg")
    Image.new("RGBA", (64, 64), (10, 200, 30, 100)).save(photos / "alpha.png")
    Image.new("P", (50, 90)).save(photos / "palette.PNG")
    for suffix in (".webp", ".bmp", ".tif"):  # other formats PIL reads are picked too
        Image.new("RGB", (80, 60), (200, 30, 30)).save(photos / f"red{suffix}")
    (photos / "notes.txt").write_text("not an image, not picked from a folder")
    out = tmp_path / "out"
    model = trained / "models/multi.safetensors"
    result = run_predict(
        [
            photos,
            "--model",
            model,
            "--out",
            out,
            "--show-grid",
            "--score",
            0.0,
            "--max-detections",
            3,
            "--no-progress",
        ]
    )
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(out / "detections.parquet")
    assert sorted(set(table["image"].map(lambda p: Path(p).name))) == [
        "alpha.png",
        "cmyk.jpg",
        "grey.jpg",
        "palette.PNG",
        "red.bmp",
        "red.tif",
        "red.webp",
    ]
    assert f"skipped {photos / 'notes.txt'}: not a format PIL reads (.txt)" in result.output
    assert (table.groupby("image").size() == 3).all()  # score 0 keeps cells; max 3 per image
    for name, size in (("grey", (333, 111)), ("cmyk", (120, 250)), ("alpha", (64, 64))):
        with Image.open(out / f"{name}.png") as drawn:
            assert drawn.size == size and drawn.mode == "RGB"
    # the grid alone (no score reaches 1): white lines between the S x S cells of the grey photo
    result = run_predict(
        [
            photos / "grey.jpg",
            "--model",
            model,
            "--out",
            out / "grid",
            "--show-grid",
            "--score",
            1.0,
            "--no-progress",
        ]
    )
    assert result.exit_code == 0, result.output
    with Image.open(out / "grid" / "grey.png") as drawn:
        pixels = drawn.load()
        s = load_checkpoint(model).card.grid.num_cells
        y = round((s // 2 - 0.5) * 111 / s)  # the middle of a row of cells
        for k in range(1, s):
            line = round(k * 333 / s)
            assert (255, 255, 255) in [pixels[x, y] for x in range(line - 1, line + 2)], k
            assert pixels[round((k - 0.5) * 333 / s), y] != (255, 255, 255)  # inside a cell


def test_every_bad_input_gets_one_line_and_the_rest_is_processed(trained, tmp_path):
    good = val_paths(trained)[0]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "truncated.jpg").write_bytes(good.read_bytes()[:300])
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "notes.txt").write_text("hello")
    (bad / "empty_folder").mkdir()
    missing = bad / "missing.jpg"
    out = tmp_path / "out"
    model = trained / "models/multi.safetensors"
    result = run_predict(
        [
            good,
            bad / "truncated.jpg",
            bad / "empty.jpg",
            bad / "notes.txt",
            bad / "empty_folder",
            missing,
            "--model",
            model,
            "--out",
            out,
            "--no-progress",
        ]
    )
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 5, result.output
    for name in ("truncated.jpg", "empty.jpg", "notes.txt", "empty_folder", "missing.jpg"):
        assert sum(name in line for line in errors) == 1, (name, errors)
    assert "Traceback" not in result.output
    assert "5 input(s) failed" in result.output
    assert (out / f"{good.stem}.png").is_file()
    assert set(pd.read_parquet(out / "detections.parquet")["image"]) <= {str(good)}


def test_bad_model_files_are_refused_before_any_work(trained, tmp_path):
    image = val_paths(trained)[0]
    model = trained / "models/multi.safetensors"
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(model.read_bytes()[:1000])
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2)}, str(foreign))
    pickled = tmp_path / "pickled.safetensors"
    torch.save({"weight": torch.zeros(2)}, pickled)  # a pickle: must never be unpickled
    checkpoint = load_checkpoint(model)
    random_backbone = tmp_path / "random.safetensors"
    card = replace(checkpoint.card, backbone=checkpoint.card.backbone | {"weights": "random"})
    save_checkpoint(random_backbone, checkpoint.head, card)
    cases = {
        truncated: "not a readable safetensors model file",
        foreign: "not a model of this pipeline",
        pickled: "not a readable safetensors model file",
        random_backbone: "randomly initialised",
        tmp_path / "absent.safetensors": "no such model file",
    }
    for path, message in cases.items():
        out = tmp_path / f"out_{path.stem}"
        result = run_predict([image, "--model", path, "--out", out, "--no-progress"])
        assert result.exit_code == 1 and message in result.output, result.output
        assert "Traceback" not in result.output
        assert not out.exists()  # nothing written


def test_readme_example_image_is_small():
    example = REPO / "docs" / "predict_example.png"
    assert example.stat().st_size < 300_000
    assert "docs/predict_example.png" in (REPO / "README.md").read_text()


def test_a_photo_over_pils_size_warning_gets_one_warning_line(trained, tmp_path, monkeypatch):
    photo = tmp_path / "large.png"
    Image.new("RGB", (20, 15), (0, 0, 0)).save(photo)  # 300 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)  # warns above 200, refuses above 400
    model = trained / "models/multi.safetensors"
    out = tmp_path / "out"
    result = run_predict([photo, "--model", model, "--out", out, "--no-progress"])
    assert result.exit_code == 0, result.output
    warned = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and str(photo) in warned[0] and "300 pixels" in warned[0], warned
    assert "warnings.warn" not in result.output and "DecompressionBombWarning" not in result.output
    assert (out / "large.png").is_file()
