"""pipeline_lib.evaluation.inference without the stages: a model file built here (a real Lite0
backbone, a head whose outputs are set by hand) loaded, run, tabulated and drawn.

The heads' last layers have zero weights and chosen biases, so every cell (or image) predicts a
known box and class: the expected detections are computed by hand below, in each photo's pixels.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import handmade
import pytest
import torch
from handmade import SIZE, lite0, logit
from PIL import Image

from pipeline_lib.boxes.detection import Detections, Filtering
from pipeline_lib.boxes.geometry import ImageSpec
from pipeline_lib.evaluation import inference
from pipeline_lib.evaluation.inference import (
    TABLE_COLUMNS,
    Detector,
    Photo,
    cell_rectangles,
    collect_images,
    detect,
    draw,
    image_suffixes,
    load_detector,
    read_photo,
    table_rows,
    unique_name,
)
from pipeline_lib.features.backbones import load_backbone
from pipeline_lib.features.devices import prepare_model
from pipeline_lib.models.checkpoints import CheckpointError, save_checkpoint
from pipeline_lib.models.headkinds import build_head
from pipeline_lib.models.modelcard import GridSpec, ModelCard


def grid_card(**changes) -> ModelCard:
    return handmade.grid_card(["cat", "dog"], **changes)


def write_model(path: Path, card: ModelCard, backbone: torch.nn.Module | None = None) -> Path:
    return handmade.write_model(path, card, backbone)


def noise_batch(n: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, SIZE, SIZE), dtype=torch.uint8, generator=generator)


def reference_features(backbone, batch: torch.Tensor, precision: str = "float32") -> torch.Tensor:
    return prepare_model(backbone, torch.device("cpu"), precision=precision)(batch)


def photo(path: Path, width: int, height: int) -> Photo:
    Image.new("RGB", (width, height), (90, 140, 200)).save(path)
    return read_photo(path, ImageSpec("shrink", SIZE))


# --- load_detector --------------------------------------------------------------------------


def test_a_model_file_loads_with_its_backbone_on_the_default_device(tmp_path):
    model = write_model(tmp_path / "m.safetensors", grid_card())
    detector = load_detector(model)  # device "auto": the CPU here
    assert detector.device == torch.device("cpu") and detector.feature_dtype == torch.float16
    assert detector.card == grid_card() and detector.classes == ["cat", "dog"]
    assert not detector.checkpoint.head.training
    batch = noise_batch()
    assert torch.equal(detector.forward(batch), reference_features(lite0(), batch))


def test_the_backbone_runs_in_the_precision_the_features_were_made_in(tmp_path):
    batch = noise_batch()
    float32, bfloat16 = (reference_features(lite0(), batch, p) for p in ("float32", "bfloat16"))
    assert not torch.equal(float32, bfloat16)
    described = lite0().describe() | {"precision": "bfloat16"}
    model = write_model(tmp_path / "bf16.safetensors", grid_card(backbone=described))
    assert torch.equal(load_detector(model, "cpu").forward(batch), bfloat16)
    described = lite0().describe() | {"precision": "float32"}
    model = write_model(tmp_path / "f32.safetensors", grid_card(backbone=described))
    assert torch.equal(load_detector(model, "cpu").forward(batch), float32)


def test_a_two_level_backbone_is_rebuilt_with_its_fine_layer(tmp_path):
    two_levels = load_backbone("efficientnet_lite0", fine_layer="blocks.4")
    card = grid_card(
        backbone=two_levels.describe(),
        feature_shape=[320 + 4 * 112, 2, 2],
        grid=GridSpec(2, fine_channels=112, fine_below=0.3),
    )
    model = write_model(tmp_path / "two.safetensors", card)
    batch = noise_batch()
    features = load_detector(model, "cpu").forward(batch)
    assert features.shape == (2, 320 + 4 * 112, 2, 2)
    assert torch.equal(features, reference_features(two_levels, batch))


def test_the_backbone_is_cut_at_the_layer_the_model_was_trained_on(tmp_path):
    at_head = load_backbone("efficientnet_lite0", "head")  # the 1280-channel conv, not "blocks"
    card = grid_card(backbone=at_head.describe(), feature_shape=[1280, 2, 2])
    model = write_model(tmp_path / "head.safetensors", card)
    batch = noise_batch()
    assert torch.equal(
        load_detector(model, "cpu").forward(batch), reference_features(at_head, batch)
    )


def test_a_finetuned_backbone_runs_with_its_own_weights(tmp_path):
    tuned = load_backbone("efficientnet_lite0")
    with torch.no_grad():
        tuned.module[0].weight.mul_(-1)  # the stem convolution (timm's conv_stem)
    model = write_model(tmp_path / "tuned.safetensors", grid_card(), tuned.module)
    batch = noise_batch()
    features = load_detector(model, "cpu").forward(batch)
    assert torch.equal(features, reference_features(tuned, batch))
    assert not torch.equal(features, reference_features(lite0(), batch))


def test_the_head_and_backbone_go_to_the_device_asked_for(tmp_path):
    """`meta` stands for a GPU (issue 21): nothing is computed, every tensor says where it is."""
    model = write_model(tmp_path / "m.safetensors", grid_card())
    detector = load_detector(model, "meta")
    assert detector.device == torch.device("meta")
    assert {p.device.type for p in detector.checkpoint.head.parameters()} == {"meta"}
    assert detector.forward(noise_batch().to("meta")).device.type == "meta"


def test_models_that_cannot_be_rebuilt_are_refused_naming_the_file_and_the_reason(tmp_path):
    described = lite0().describe()
    cases = {
        "dtype": (grid_card(feature_dtype="float8"), "unknown feature dtype 'float8'"),
        "random": (
            grid_card(backbone=described | {"weights": "random"}),
            "trained on features of a randomly initialised efficientnet_lite0, which cannot be "
            "rebuilt here; retrain with backbone.weights: imagenet",
        ),
        "none": (
            grid_card(image=ImageSpec("none", SIZE)),
            "image mode 'none' cannot batch images",
        ),
        "normalised": (
            grid_card(backbone=described | {"mean": [0.4, 0.4, 0.4]}),
            "trained with normalisation mean [0.4, 0.4, 0.4] std [0.5, 0.5, 0.5], but "
            "efficientnet_lite0 here uses [0.5, 0.5, 0.5] / [0.5, 0.5, 0.5]",
        ),
        "std": (
            grid_card(backbone=described | {"std": [0.25, 0.5, 0.5]}),
            "std [0.25, 0.5, 0.5], but efficientnet_lite0 here uses",
        ),
    }
    for name, (card, message) in cases.items():
        path = write_model(tmp_path / f"{name}.safetensors", card)
        with pytest.raises(CheckpointError) as raised:
            load_detector(path, "cpu")
        assert str(raised.value).startswith(f"{path}: "), str(raised.value)
        assert message in str(raised.value), str(raised.value)
    foreign = write_model(tmp_path / "foreign.safetensors", grid_card(), torch.nn.Conv2d(3, 4, 1))
    with pytest.raises(CheckpointError) as raised:
        load_detector(foreign, "cpu")
    first = "Error(s) in loading state_dict for Sequential:"
    expected = f"{foreign}: backbone weights do not fit efficientnet_lite0 ({first})"
    assert str(raised.value) == expected


# --- detect ----------------------------------------------------------------------------------


def test_grid_detections_come_back_in_each_photos_own_pixels(tmp_path):
    detector = load_detector(write_model(tmp_path / "m.safetensors", grid_card()), "cpu")
    photos = [photo(tmp_path / "wide.png", 200, 100), photo(tmp_path / "tall.png", 100, 300)]
    wide, tall = detect(detector, photos, Filtering(0.2, 0.5, 100))
    # Each cell (i, j) of 2: centre ((j + 0.5) / 2 W, (i + 0.5) / 2 H), size 0.25 W x 0.5 H.
    score = 1 / (1 + math.exp(-3)) * math.exp(2) / (math.exp(2) + 1)
    expected_wide = [[25.0, 0, 75, 50], [125, 0, 175, 50], [25, 50, 75, 100], [125, 50, 175, 100]]
    expected_tall = [[12.5, 0, 37.5, 150], [62.5, 0, 87.5, 150]]
    expected_tall += [[12.5, 150, 37.5, 300], [62.5, 150, 87.5, 300]]
    for found, expected in ((wide, expected_wide), (tall, expected_tall)):
        assert torch.allclose(
            torch.tensor(sorted(found.boxes.tolist())), torch.tensor(sorted(expected))
        )
        assert found.scores.tolist() == pytest.approx([score] * 4)
        assert found.labels.tolist() == [0] * 4 and found.labels.dtype == torch.int64
        assert not found.boxes.requires_grad and not found.scores.requires_grad
    # `keep` decides: above the score nothing, at most one detection per photo
    assert [len(d) for d in detect(detector, photos, Filtering(0.9, 0.5, 100))] == [0, 0]
    assert [len(d) for d in detect(detector, photos, Filtering(0.2, 0.5, 1))] == [1, 1]


def test_a_head_that_decodes_itself_is_asked_to(tmp_path):
    """FCOS's head has its own decoding (`detections`): detect hands it the outputs, the photos'
    sizes, the image mode and `keep`."""
    card = grid_card(head={"kind": "fcos", "width": 32, "depth": 1})
    detector = load_detector(write_model(tmp_path / "fcos.safetensors", card), "cpu")
    head, calls = detector.checkpoint.head, []
    decode = head.detections
    head.detections = lambda *args: calls.append(args) or decode(*args)
    photos = [photo(tmp_path / "wide.png", 200, 100), photo(tmp_path / "tall.png", 100, 300)]
    keep = Filtering(0.0, None, 3)
    found = detect(detector, photos, keep)
    ((outputs, sizes, spec, kept),) = calls
    assert sizes == [(200, 100), (100, 300)] and spec == card.image and kept is keep
    assert [len(d) for d in found] == [3, 3] and all(len(t) == 2 for t in outputs)


def test_the_head_reads_features_rounded_to_the_stored_dtype(tmp_path):
    detector = load_detector(write_model(tmp_path / "m.safetensors", grid_card()), "cpu")
    seen = []
    detector.checkpoint.head.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    photos = [photo(tmp_path / "a.png", 90, 60), photo(tmp_path / "b.png", 70, 80)]
    detect(detector, photos, Filtering())
    (features,) = seen
    expected = detector.forward(torch.stack([p.pixels for p in photos])).to(torch.float16)
    assert torch.equal(features, expected.float())
    assert not torch.equal(features, detector.forward(torch.stack([p.pixels for p in photos])))


def test_the_photos_go_to_the_detectors_device_as_one_batch(tmp_path):
    """The backbone's input is moved to `device` (`meta` for a GPU); the head then runs here."""
    detector = load_detector(write_model(tmp_path / "m.safetensors", grid_card()), "cpu")
    inputs = []

    def backbone(batch: torch.Tensor) -> torch.Tensor:
        inputs.append(batch)
        return torch.zeros(len(batch), 320, 2, 2)

    on_meta = replace(detector, forward=backbone, device=torch.device("meta"))
    photos = [photo(tmp_path / "a.png", 90, 60), photo(tmp_path / "b.png", 70, 80)]
    assert len(detect(on_meta, photos, Filtering())) == 2
    ((batch,),) = [inputs]
    assert batch.device.type == "meta" and batch.dtype == torch.uint8
    assert batch.shape == (2, 3, SIZE, SIZE)


def test_the_single_head_gives_one_box_per_photo_whatever_its_score(tmp_path):
    card = grid_card(kind="single", head={"hidden": 8}, grid=None)
    head = build_head(card)
    with torch.no_grad():
        head.regression[-2].weight.zero_()
        head.regression[-2].bias.copy_(torch.tensor([logit(0.5), logit(0.5), 0.0, logit(0.25)]))
        head.classification[-1].weight.zero_()
        head.classification[-1].bias.copy_(torch.tensor([0.0, math.log(3.0)]))
    save_checkpoint(tmp_path / "single.safetensors", head, card)
    detector = load_detector(tmp_path / "single.safetensors", "cpu")
    photos = [photo(tmp_path / "wide.png", 200, 100), photo(tmp_path / "tall.png", 100, 300)]
    wide, tall = detect(detector, photos, Filtering(score_threshold=0.99))
    # centre (W / 2, H / 2), size W / 2 x H / 4; class 1 at softmax 0.75
    assert torch.allclose(wide.boxes, torch.tensor([[50, 37.5, 150, 62.5]]))
    assert torch.allclose(tall.boxes, torch.tensor([[25, 112.5, 75, 187.5]]))
    assert wide.labels.tolist() == tall.labels.tolist() == [1]
    assert wide.scores.tolist() == pytest.approx([0.75])


# --- table, drawing, inputs -----------------------------------------------------------------


def test_table_rows_by_hand():
    found = Detections(
        torch.tensor([[1.234, 2.345, 3.456, 4.567], [0.0, 0.0, 10.0, 20.004]]),
        torch.tensor([0.123456789, 0.9]),
        torch.tensor([1, 0]),
    )
    rows = table_rows(Path("photos/a.jpg"), found, ["cat", "dog"])
    assert rows == [
        {"image": "photos/a.jpg", "class": "dog", "score": 0.12346}
        | {"xmin": 1.23, "ymin": 2.35, "xmax": 3.46, "ymax": 4.57},
        {"image": "photos/a.jpg", "class": "cat", "score": 0.9}
        | {"xmin": 0.0, "ymin": 0.0, "xmax": 10.0, "ymax": 20.0},
    ]
    assert [list(row) for row in rows] == [TABLE_COLUMNS] * 2
    assert (
        table_rows(Path("b.jpg"), Detections(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0)), [])
        == []
    )


def test_draw_labels_each_box_with_class_and_score_and_the_grid_on_request(tmp_path, monkeypatch):
    detector = load_detector(write_model(tmp_path / "m.safetensors", grid_card()), "cpu")
    image = Image.new("RGB", (120, 80), (0, 0, 0))
    found = Detections(
        torch.tensor([[10.0, 10, 50, 40], [60, 20, 110, 70]]),
        torch.tensor([0.876, 0.5]),
        torch.tensor([1, 0]),
    )
    drawn = draw(detector, image, found, show_grid=False)
    assert drawn.size == (120, 80) and drawn.getpixel((10, 25)) != (0, 0, 0)
    assert drawn.getpixel((30, 75)) == (0, 0, 0)  # no grid line at the cells' border (y 40)
    with_grid = draw(detector, image, found, show_grid=True)
    assert with_grid.getpixel((5, 40)) == (255, 255, 255)  # the border between the cell rows
    calls = []
    monkeypatch.setattr(inference, "annotate", lambda *args: calls.append(args))
    draw(detector, image, found, show_grid=True)
    draw(detector, image, found, show_grid=False)
    (_, boxes, texts, labels, cells), (*_, no_cells) = calls
    assert texts == ["dog 0.88", "cat 0.50"] and labels == [1, 0] and boxes is found.boxes
    assert torch.equal(cells, cell_rectangles(detector.card, 120, 80)) and no_cells is None


def test_collect_images_expands_folders_and_names_what_it_skips(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("b.JPG", "a.png", "c.webp", "notes.txt", "README", ".hidden.txt"):
        (folder / name).write_bytes(b"x")
    (folder / "inner").mkdir()  # folders inside are not searched
    (tmp_path / "empty").mkdir()
    (tmp_path / "given.txt").write_bytes(b"x")  # a file given by name is taken as it is
    found = collect_images(
        [tmp_path / "given.txt", folder, tmp_path / "missing.jpg", tmp_path / "empty"]
    )
    assert found.paths == [tmp_path / "given.txt"] + [folder / n for n in ("a.png", "b.JPG")] + [
        folder / "c.webp"
    ]
    assert found.skipped == [
        f"{folder / 'README'}: not a format PIL reads (no suffix)",
        f"{folder / 'notes.txt'}: not a format PIL reads (.txt)",
    ]
    assert found.problems == [
        f"{tmp_path / 'missing.jpg'}: no such file or folder",
        f"{tmp_path / 'empty'}: no image files in this folder",
    ]


def test_image_suffixes_are_the_formats_pil_opens_in_lower_case():
    suffixes = image_suffixes()
    assert {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".webp"} <= suffixes
    assert ".pdf" not in suffixes  # PIL writes PDF but cannot open it
    assert all(s == s.lower() and s.startswith(".") for s in suffixes)


def test_unique_name_numbers_repeated_stems():
    taken: set[str] = set()
    names = [unique_name(Path(p), taken) for p in ("a/x.jpg", "b/x.png", "x.gif", "y.jpg")]
    assert names == ["x.png", "x_2.png", "x_3.png", "y.png"]
    assert taken == set(names)
    assert unique_name(Path("x_2.jpg"), taken) == "x_2_2.png"  # x_2.png is taken already


def test_detector_reports_its_card_and_classes(tmp_path):
    detector = load_detector(write_model(tmp_path / "m.safetensors", grid_card()), "cpu")
    assert isinstance(detector, Detector)
    assert detector.card is detector.checkpoint.card and detector.classes == ["cat", "dog"]
