"""Feature extraction: file layout, equality with a plain forward pass, bad images, interruption."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torchvision.transforms.v2 import functional as F

from pipeline_lib import devices as devices_lib
from pipeline_lib import featurefiles
from pipeline_lib import features as features_lib
from pipeline_lib import images as images_lib
from pipeline_lib.backbones import Backbone, load_backbone
from pipeline_lib.devices import pick_precision, prepare_model
from pipeline_lib.distributed import ONE_PROCESS, Ranks
from pipeline_lib.errors import PipelineError
from pipeline_lib.featurefiles import read_features
from pipeline_lib.features import ExtractResult, ExtractSettings, extract_features
from pipeline_lib.geometry import ImageSpec
from pipeline_lib.images import ImageError, ImageFolder, load_image_tensor
from pipeline_lib.params import ParamsError, load_params

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return load_backbone("resnet18", "layer4", "random")


@pytest.fixture
def images(tmp_path) -> list[Path]:
    """Five small photos-like images of different sizes (and one greyscale, one CMYK)."""
    torch.manual_seed(1)
    paths = []
    for i, (w, h, mode) in enumerate(
        [(120, 90, "RGB"), (64, 128, "RGB"), (100, 100, "L"), (150, 80, "CMYK"), (90, 90, "RGB")]
    ):
        pixels = (torch.rand(h, w, 3) * 255).to(torch.uint8).numpy()
        image = Image.fromarray(pixels).convert(mode)
        path = tmp_path / f"img{i}.jpg"
        image.save(path, quality=95)
        paths.append(path)
    return paths


def direct_forward(backbone, path: Path, mode: str, size: int) -> torch.Tensor:
    """The textbook torchvision path: decode, antialiased bilinear resize / centre crop of the
    uint8 tensor, to float, normalise, NCHW float32 forward."""
    image = F.pil_to_tensor(Image.open(path).convert("RGB"))
    if mode == "shrink":
        image = F.resize(image, [size, size], antialias=True)
    else:
        image = F.center_crop(image, [size, size])
    x = F.normalize(
        F.to_dtype(image, torch.float32, scale=True),
        list(backbone.mean),
        list(backbone.std),
    )
    with torch.no_grad():
        return backbone.module.eval()(x[None])[0]


@pytest.mark.parametrize("mode", ["shrink", "crop"])
def test_features_equal_a_direct_forward_pass(resnet18, images, tmp_path, mode):
    ids = [f"id{i}" for i in range(len(images))]
    out = tmp_path / "train.safetensors"
    result = extract_features(
        resnet18,
        dict(zip(ids, images, strict=True)),
        out,
        ImageSpec(mode, 96),
        ExtractSettings(batch_size=2, workers=1),
        progress=None,
    )
    features = read_features(out)
    assert features.image_ids == ids == result.image_ids
    assert features.features.shape == (5, 512, 3, 3) and features.features.dtype == torch.float16
    for row, path in enumerate(images):
        expected = direct_forward(resnet18, path, mode, 96)
        assert torch.allclose(features.features[row].float(), expected, rtol=1e-2, atol=2e-2)
    assert features.metadata["backbone"]["name"] == "resnet18"
    assert features.metadata["image_mode"] == mode


@pytest.mark.parametrize(
    ("device", "avx512_bf16", "amx", "gpu_bf16", "expected"),
    [
        ("cpu", True, False, False, "bfloat16"),  # AVX-512 BF16
        ("cpu", False, True, False, "bfloat16"),  # AMX tiles
        ("cpu", False, False, True, "float32"),  # AVX2 only (a GPU elsewhere does not count)
        ("cuda", False, False, True, "bfloat16"),  # Ampere on
        ("cuda", True, True, False, "float32"),  # an older GPU (bfloat16 only emulated)
    ],
)
def test_auto_precision_follows_the_hardware(
    monkeypatch, device, avx512_bf16, amx, gpu_bf16, expected
):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    asked = []

    def gpu(including_emulation=True):
        asked.append(including_emulation)
        return gpu_bf16 or including_emulation  # torch's default counts emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", gpu)
    assert pick_precision("auto", torch.device(device)) == expected
    assert asked == ([False] if device == "cuda" else [])
    for chosen in ("float32", "bfloat16"):  # asked for by name: kept on any hardware
        assert pick_precision(chosen, torch.device(device)) == chosen
    with pytest.raises(ParamsError, match="backbone.precision: 'float16'"):
        pick_precision("float16", torch.device(device))


def test_bfloat16_features_are_recorded_and_close_to_float32(resnet18, images, tmp_path):
    """Extraction in bfloat16 (emulated on CPUs without it): the file says so, its rows differ
    from float32 by bfloat16's rounding (8 significant bits: ~0.4 % per value, accumulated over
    the layers), and the model function predict uses gives the same numbers in each precision."""
    ids = [f"id{i}" for i in range(len(images))]
    files = {}
    for precision in ("float32", "bfloat16"):
        files[precision] = tmp_path / f"{precision}.safetensors"
        extract_features(
            resnet18,
            dict(zip(ids, images, strict=True)),
            files[precision],
            ImageSpec("shrink", 64),
            ExtractSettings(store_dtype="float32", batch_size=8, workers=0, precision=precision),
            progress=None,
        )
    exact, approx = (read_features(files[p]) for p in ("float32", "bfloat16"))
    assert exact.metadata["backbone"]["precision"] == "float32"
    assert approx.metadata["backbone"]["precision"] == "bfloat16"
    batch = torch.stack([load_image_tensor(p, "shrink", 64) for p in images])
    relative = (approx.features - exact.features).norm() / exact.features.norm()
    assert 1e-4 < relative < 0.05  # rounded, not another computation
    for precision, stored in (("float32", exact), ("bfloat16", approx)):
        forward = prepare_model(resnet18, torch.device("cpu"), batch_size=8, precision=precision)
        assert torch.equal(forward(batch), stored.features)  # what predict runs


def photo(path: Path, width: int, height: int) -> Path:
    """A JPEG with smooth gradients and fine detail (as a photo has both)."""
    y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    torch.manual_seed(2)
    pixels = torch.stack([x * 200, y * 200, (x + y) * 100]) + torch.rand(3, height, width) * 50
    F.to_pil_image(pixels.clamp(0, 255).to(torch.uint8)).save(path, quality=90)
    return path


def full_decode(path: Path, draft: tuple[int, int] | None = None) -> torch.Tensor:
    with Image.open(path) as image:
        if draft:
            image.draft(None, draft)
        return F.pil_to_tensor(image.convert("RGB"))


def test_large_jpegs_are_decoded_at_a_lower_scale_under_shrink(tmp_path):
    """A JPEG at least twice the target size each way is decoded by DCT scaling (PIL's draft:
    1000 x 800 for 224 -> 1/2 scale, 500 x 400), then resized; a smaller one, and any image under
    crop, are decoded fully."""
    big, small = photo(tmp_path / "big.jpg", 1000, 800), photo(tmp_path / "small.jpg", 500, 375)
    drafted = full_decode(big, (224, 224))
    assert drafted.shape == (3, 400, 500)  # PIL scaled by 1/2: 800 // 224 = 3 -> 2
    got = load_image_tensor(big, "shrink", 224)
    assert torch.equal(got, F.resize(drafted, [224, 224], antialias=True))
    full = F.resize(full_decode(big), [224, 224], antialias=True)
    apart = (got.float() - full.float()).abs()
    assert 0 < apart.mean() < 2  # a lower-scale decode, but the same picture
    for path, mode, expected in (
        (small, "shrink", F.resize(full_decode(small), [224, 224], antialias=True)),  # < 2x
        (big, "crop", F.center_crop(full_decode(big), [224, 224])),  # crop keeps the pixels
    ):
        assert torch.equal(load_image_tensor(path, mode, 224), expected)


COMPILED_VS_EAGER = """
import sys
from pathlib import Path
import torch
from pipeline_lib.backbones import load_backbone
from pipeline_lib.features import ExtractSettings, extract_features
from pipeline_lib.geometry import ImageSpec
out, images = Path(sys.argv[1]), sys.argv[2:]
torch.manual_seed(0)
backbone = load_backbone("squeezenet1_1", "features", "random")
ids = [f"id{i}" for i in range(len(images))]
for name, flag in (("eager", False), ("compiled", True)):
    settings = ExtractSettings(store_dtype="float32", batch_size=2, workers=0, compile=flag)
    extract_features(backbone, dict(zip(ids, map(Path, images))), out / f"{name}.safetensors",
                     ImageSpec("shrink", 64), settings, progress=None)
"""


def test_compiled_path_equals_eager_with_a_padded_last_batch(images, tmp_path):
    """backbone.compile: 5 images in batches of 2 -> the last batch (1 image) is padded, not
    recompiled, and the features match the eager path. Run in a process of its own, as the
    extract stage runs: torch.compile's generated code once aborted a pytest-xdist worker that
    had run other tests' torch work before (OpenMP state shared with them)."""
    subprocess.run(
        [sys.executable, "-c", COMPILED_VS_EAGER, str(tmp_path), *map(str, images)],
        cwd=REPO,
        check=True,
        timeout=600,
    )
    a = read_features(tmp_path / "eager.safetensors")
    b = read_features(tmp_path / "compiled.safetensors")
    ids = [f"id{i}" for i in range(len(images))]
    assert a.image_ids == b.image_ids == ids and a.features.shape == b.features.shape
    assert torch.allclose(a.features, b.features, rtol=1e-3, atol=1e-3)


def test_file_is_plain_safetensors_with_float32_option(resnet18, images, tmp_path):
    out = tmp_path / "val.safetensors"
    extract_features(
        resnet18,
        dict(zip(["a", "b", "c"], images[:3], strict=True)),
        out,
        ImageSpec("shrink", 64),
        ExtractSettings(store_dtype="float32", workers=0),
        progress=None,
    )
    with safe_open(str(out), framework="pt") as handle:
        assert list(handle.keys()) == ["features"]
        tensor = handle.get_tensor("features")
        metadata = handle.metadata()
    assert json.loads(metadata.pop("image_ids")) == ["a", "b", "c"]
    backbone = resnet18.describe() | {"precision": "float32"}
    assert metadata == {
        "backbone": json.dumps(backbone),
        "image_mode": "shrink",
        "image_size": "64",
    }
    assert tensor.dtype == torch.float32 and tensor.shape == (3, 512, 2, 2)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def bad_files(tmp_path, good: Path) -> dict[str, Path]:
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    png = tmp_path / "png_named.jpg"
    Image.open(good).save(png, format="PNG")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    return {"truncated": truncated, "png": png, "empty": empty, "missing": tmp_path / "gone.jpg"}


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("truncated", "cannot decode"),
        ("png", "a PNG file named .jpg"),
        ("empty", "cannot decode"),
        ("missing", "missing (was it deleted since prepare ran?)"),
    ],
)
def test_bad_image_raises_naming_the_file_or_is_skipped(resnet18, images, tmp_path, kind, words):
    bad = bad_files(tmp_path, images[0])[kind]
    paths = [images[0], bad, images[1]]
    out = tmp_path / "f.safetensors"
    with pytest.raises(ImageError, match=re.escape(words)) as info:
        extract_features(
            resnet18,
            dict(zip(["a", "bad", "b"], paths, strict=True)),
            out,
            ImageSpec("shrink", 64),
            ExtractSettings(workers=0),
            progress=None,
        )
    assert bad.name in str(info.value)
    assert not out.exists() and [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    result = extract_features(
        resnet18,
        dict(zip(["a", "bad", "b"], paths, strict=True)),
        out,
        ImageSpec("shrink", 64),
        ExtractSettings(workers=1, on_error="skip"),
        progress=None,
    )
    assert result.image_ids == ["a", "b"]
    assert [s["image_id"] for s in result.skipped] == ["bad"] and words in result.skipped[0][
        "reason"
    ]
    stored = read_features(out)
    assert stored.image_ids == ["a", "b"] and stored.features.shape[0] == 2
    # batches of one: a batch with no image left in it between two good ones (features equal
    # up to the last bits: oneDNN sums a batch of one in another order)
    settings = ExtractSettings(batch_size=1, workers=0, on_error="skip")
    again = extract_features(
        resnet18,
        dict(zip(["a", "bad", "b"], paths, strict=True)),
        out,
        ImageSpec("shrink", 64),
        settings,
        progress=None,
    )
    again_stored = read_features(out).features.float()
    assert again.image_ids == ["a", "b"]
    assert torch.allclose(again_stored, stored.features.float(), atol=0.02)


def test_decompression_bomb_guard(resnet18, images, tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # every test image is > 2x this
    with pytest.raises(ImageError, match="cannot decode.*decompression bomb"):
        extract_features(
            resnet18,
            dict(zip(["a"], images[:1], strict=True)),
            tmp_path / "f.safetensors",
            ImageSpec("shrink", 64),
            ExtractSettings(workers=0),
            progress=None,
        )


def test_mode_none_is_refused(resnet18, images, tmp_path):
    with pytest.raises(ParamsError) as raised:
        extract_features(
            resnet18,
            dict(zip(list("abcde"), images, strict=True)),
            tmp_path / "f.safetensors",
            ImageSpec("none", 64),
            ExtractSettings(),
        )
    assert str(raised.value) == (
        "image.mode: none keeps every image's own size, so features cannot be stacked into one "
        "tensor; use shrink or crop for extraction"
    )


def test_interrupted_run_leaves_no_file(resnet18, images, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = features_lib.prepare_model

    def interrupted_after_one_batch(backbone, device, *args):
        forward = real(backbone, device, *args)

        def wrapped(batch):
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt
            return forward(batch)

        return wrapped

    monkeypatch.setattr(features_lib, "prepare_model", interrupted_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        extract_features(
            resnet18,
            dict(zip(list("abcde"), images, strict=True)),
            tmp_path / "f.safetensors",
            ImageSpec("shrink", 64),
            ExtractSettings(batch_size=2, workers=0),
            progress=None,
        )
    assert calls["n"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in images)


def test_time_is_split_by_part_and_rows_keep_their_order(resnet18, images, tmp_path, monkeypatch):
    """Each batch is written after the next one started (so a GPU computes while the CPU
    writes): the rows still land in order around a skipped image, and the time goes to the part
    that spent it: a slow first batch to start-up, a slow model to the backbone."""
    real_model, real_load = features_lib.prepare_model, images_lib.load_image_tensor
    first = {"slept": False}

    def slow_model(backbone, device, *args):
        forward = real_model(backbone, device, *args)
        return lambda batch: (time.sleep(0.2), forward(batch))[1]

    def slow_start(path, mode, size):
        if not first["slept"]:
            first["slept"] = True
            time.sleep(0.3)
        return real_load(path, mode, size)

    monkeypatch.setattr(features_lib, "prepare_model", slow_model)
    monkeypatch.setattr(images_lib, "load_image_tensor", slow_start)  # ImageFolder's
    paths = [*images[:2], bad_files(tmp_path, images[0])["truncated"], *images[2:]]
    ids = ["a", "b", "bad", "c", "d", "e"]
    settings = ExtractSettings(batch_size=2, workers=0, on_error="skip")
    out = tmp_path / "f.safetensors"
    result = extract_features(
        resnet18, dict(zip(ids, paths, strict=True)), out, ImageSpec("shrink", 64), settings, None
    )
    assert result.image_ids == ["a", "b", "c", "d", "e"] == read_features(out).image_ids
    features = read_features(out).features.float()
    single = {}
    for name, path in zip(ids, paths, strict=True):
        if name != "bad":
            alone = tmp_path / f"{name}.safetensors"
            extract_features(
                resnet18,
                {name: path},
                alone,
                ImageSpec("shrink", 64),
                ExtractSettings(batch_size=2, workers=0),
                None,
            )
            single[name] = read_features(alone).features.float()[0]
    for row, name in enumerate(result.image_ids):
        assert torch.allclose(features[row], single[name], atol=1e-2), name
    parts = result.parts
    assert list(parts) == ["startup", "decoding", "backbone", "writing"]
    assert parts["startup"] >= 0.3 and parts["backbone"] >= 3 * 0.2  # 3 batches
    assert sum(parts.values()) <= result.seconds
    assert result.report()["seconds_by_part"] == {k: round(v, 2) for k, v in parts.items()}


def write_feature_file(path: Path, features: torch.Tensor) -> None:
    """A feature file as extract writes it (safetensors' own writer, the pipeline's metadata)."""
    ids = [f"img{i}" for i in range(len(features))]
    metadata = {"image_ids": json.dumps(ids), "backbone": json.dumps({"name": "x"})}
    save_file({"features": features}, str(path), metadata | {"image_mode": "shrink"})


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_rows_read_from_disk_equal_the_loaded_tensor(tmp_path, dtype):
    features = torch.randn(11, 3, 4, 5).to(dtype)
    write_feature_file(tmp_path / "f.safetensors", features)
    lazy = read_features(tmp_path / "f.safetensors", lazy=True)
    assert lazy.image_ids == read_features(tmp_path / "f.safetensors").image_ids
    rows = lazy.features
    assert len(rows) == 11 and rows.shape == features.shape and rows.dtype == dtype
    assert torch.equal(rows[2:7], features[2:7]) and torch.equal(rows[4], features[4])
    order = torch.tensor([10, 0, 3, 3])
    assert torch.equal(rows[order], features[order])
    mask = torch.tensor([i % 3 == 0 for i in range(11)])  # rows 0, 3, 6, 9
    view = rows.select(mask)
    assert len(view) == 4 and torch.equal(view[torch.tensor([3, 1])], features[[9, 3]])
    assert torch.equal(view[0:4], features[mask])


def test_a_truncated_file_is_refused_when_read_lazily(tmp_path):
    path = tmp_path / "f.safetensors"
    write_feature_file(path, torch.zeros(6, 2, 2, 2, dtype=torch.float16))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(PipelineError, match=re.escape(str(path))):
        read_features(path, lazy=True)


def test_training_from_disk_gives_the_model_training_in_memory_gives(tmp_path):
    from torch import nn

    from pipeline_lib.training import Dataset, Objective, TrainConfig, fit

    features = torch.randn(37, 4, 3, 3).half()  # 37: the last batch is short
    write_feature_file(tmp_path / "f.safetensors", features)
    targets = (torch.randn(37, 2),)
    objective = Objective(
        lambda out, t: {"loss": nn.functional.mse_loss(out, t[0])}, lambda out, t: {}
    )
    config = TrainConfig(epochs=3, batch_size=8, lr=0.01, weight_decay=0.0, seed=1, monitor="loss")
    states = []
    for lazy in (False, True):
        rows = read_features(tmp_path / "f.safetensors", lazy=lazy).features
        torch.manual_seed(0)
        head = nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
        data = Dataset(rows, targets)
        result = fit(head, data, data, objective, config, progress=False)
        states.append(result.best_state)
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_rows_are_picked_by_number_mask_or_view_of_a_view(tmp_path):
    features = torch.randn(6, 2, 1, 1).half()
    write_feature_file(tmp_path / "f.safetensors", features)
    rows = read_features(tmp_path / "f.safetensors", lazy=True).features
    picked = rows.select(torch.tensor([3, 0, 5]))  # numbers, out of order, 0 included
    assert torch.equal(picked[0:3], features[[3, 0, 5]])
    assert torch.equal(picked.select(torch.tensor([False, True, True]))[0:2], features[[0, 5]])
    assert torch.equal(rows[torch.tensor([-1, -6])], features[[5, 0]])  # as a tensor counts
    assert torch.equal(rows[-2], features[4])
    with pytest.raises(IndexError):
        rows[torch.tensor([6])]


def test_lazy_rows_start_where_the_header_says(tmp_path):
    """The features need not be the file's first tensor: their offset comes from the header."""
    features = torch.randn(4, 3, 2, 2).half()
    path = tmp_path / "f.safetensors"
    metadata = {"image_ids": json.dumps(list("abcd")), "backbone": json.dumps({"name": "x"})}
    save_file({"features": features, "aaa": torch.arange(10.0)}, str(path), metadata)
    with safe_open(str(path), framework="pt") as handle:  # "aaa" is stored first
        assert handle.keys() == ["aaa", "features"]
    lazy = read_features(path, lazy=True)
    assert torch.equal(lazy.features[0:4], features)


def test_feature_files_that_cannot_be_read_say_why(tmp_path):
    path = tmp_path / "f.safetensors"
    with pytest.raises(PipelineError) as raised:
        read_features(path)
    assert str(raised.value) == (
        f"{path}: no feature file; run the extract stage first (dvc repro extract)"
    )
    metadata = {"image_ids": json.dumps(["a", "b"]), "backbone": json.dumps({"name": "x"})}
    save_file({"features": torch.zeros(3, 4, 1, 1)}, str(path), metadata)
    for lazy in (False, True):
        with pytest.raises(PipelineError) as raised:
            read_features(path, lazy=lazy)
        assert str(raised.value) == f"{path}: 3 rows but 2 image ids"
    save_file({"features": torch.zeros(2, 4, 1, 1, dtype=torch.float64)}, str(path), metadata)
    with pytest.raises(PipelineError) as raised:
        read_features(path, lazy=True)
    assert str(raised.value) == (
        f"{path}: not a readable feature file (features in F64, not float16 / float32); run dvc "
        "repro extract"
    )
    write_feature_file(path, torch.zeros(6, 2, 2, 2, dtype=torch.float16))
    path.write_bytes(path.read_bytes()[:-1])  # one byte short: safetensors' check says so
    with pytest.raises(PipelineError) as raised:
        read_features(path, lazy=True)
    assert str(raised.value).startswith(f"{path}: not a readable feature file (")
    assert str(raised.value).endswith("); run dvc repro extract")
    # cut after it was opened: the row that is not there any more is named
    write_feature_file(path, torch.zeros(6, 2, 2, 2, dtype=torch.float16))
    rows = read_features(path, lazy=True).features
    path.write_bytes(path.read_bytes()[:-20])
    assert rows[0].shape == (2, 2, 2)
    with pytest.raises(PipelineError) as raised:
        rows[5]
    assert str(raised.value) == f"{path}: row 5 is cut short (file truncated?)"


def test_image_folder_items_flip_left_to_right_and_carry_errors(tmp_path):
    pixels = torch.arange(3 * 4 * 6, dtype=torch.uint8).view(3, 4, 6) * 3
    F.to_pil_image(pixels).save(tmp_path / "a.png")
    (tmp_path / "bad.png").write_text("not an image")
    paths = [tmp_path / "a.png", tmp_path / "bad.png"]
    plain, flipped = ImageFolder(paths, "crop", 4), ImageFolder(paths, "crop", 4, flipped=True)
    index, image, error = plain[0]
    assert index == 0 and error is None and torch.equal(image, pixels[:, :, 1:5])
    index, mirrored, error = flipped[0]
    assert torch.equal(mirrored, pixels[:, :, 1:5].flip(-1)) and error is None
    index, image, error = plain[1]
    assert (index, image) == (1, None) and error.startswith(f"{tmp_path / 'bad.png'}: image: ")


def test_an_extraction_reports_its_figures_rounded():
    result = ExtractResult(
        ["a", "b", "c"],
        (3, 8, 2, 2),
        seconds=1.23456,
        skipped=[{"image_id": "d", "reason": "bad"}],
        parts={"decoding": 0.3333, "backbone": 0.9},
    )
    assert result.report() == {
        "images": 3,
        "skipped": 1,
        "seconds": 1.23,
        "images_per_second": 3.2,  # 4 images (the skipped one read too) in 1.23456 s
        "seconds_by_part": {"decoding": 0.33, "backbone": 0.9},
        "skipped_images": [{"image_id": "d", "reason": "bad"}],
    }


def test_extract_settings_come_from_the_backbone_params(monkeypatch):
    bb = replace(
        load_params(REPO / "params.yaml").backbone,
        store_dtype="float32",
        batch_size=3,
        device="cpu",
        precision="bfloat16",
        compile=True,
        workers=2,
    )
    expected = ExtractSettings("float32", 3, "cpu", "bfloat16", True, 2, "skip")
    assert ExtractSettings.from_params(bb, "skip") == expected
    for native, precision in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(devices_lib, "native_bfloat16", lambda device, n=native: n)
        auto = ExtractSettings.from_params(replace(bb, precision="auto"), "raise")
        assert auto == replace(expected, precision=precision, on_error="raise")


def test_devices_other_than_cpu_and_cuda_compute_in_float32_unless_asked():
    meta = torch.device("meta")
    assert not devices_lib.native_bfloat16(meta)
    assert pick_precision("auto", meta) == "float32"
    assert pick_precision("bfloat16", meta) == "bfloat16"


def test_ranks_rows_are_merged_in_rank_order(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    raw.write_bytes(b"x" * 12)
    mine = features_lib._Rows(kept=[], skipped=[{"image_id": "a", "reason": "bad"}])
    assert features_lib._merge_ranks(raw, mine, Ranks()) is mine  # one process: as it is
    gathered, sizes = [], []
    parts = [
        ([], [{"image_id": "a", "reason": "bad"}], None, 12),
        (["b", "c"], [], (4, 1, 1), 32),
        (["d"], [{"image_id": "e", "reason": "worse"}], (4, 1, 1), 16),
    ]
    ranks = Ranks(rank=0, world=3)
    monkeypatch.setattr(
        features_lib, "all_gather", lambda obj, to: gathered.append((obj, to)) or parts
    )
    monkeypatch.setattr(
        features_lib, "gather_bytes", lambda path, n, to: sizes.append((path, n, to))
    )
    merged = features_lib._merge_ranks(raw, mine, ranks)
    assert gathered == [(([], [{"image_id": "a", "reason": "bad"}], None, 12), ranks)]
    assert sizes == [(raw, [12, 32, 16], ranks)]
    assert merged.kept == ["b", "c", "d"] and merged.shape == (4, 1, 1)
    assert merged.skipped == [
        {"image_id": "a", "reason": "bad"},
        {"image_id": "e", "reason": "worse"},
    ]
    assert merged.clock is mine.clock


def test_our_streamed_file_is_the_file_safetensors_writes(tmp_path):
    """Byte for byte (one metadata key: safetensors orders several as its hash map does)."""
    tensor = torch.randn(3, 5, 2, 1).half()  # 60 bytes a row: the header needs padding
    raw = tmp_path / "raw"
    raw.write_bytes(tensor.numpy().tobytes())
    for metadata in ({"image_mode": "shrink"}, {"image_mode": "crop!"}):
        ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
        featurefiles.write_feature_file(ours, raw, tuple(tensor.shape), torch.float16, metadata)
        save_file({"features": tensor}, str(theirs), metadata)
        assert ours.read_bytes() == theirs.read_bytes()
    with pytest.raises(RuntimeError) as raised:
        featurefiles.write_feature_file(ours, raw, (4, 5, 2, 1), torch.float16, metadata)
    assert str(raised.value) == f"{raw}: 60 bytes written, 80 expected for (4, 5, 2, 1)"


def test_gpu_features_come_back_without_blocking_and_are_waited_for(monkeypatch):
    """CI has no GPU: a stand-in tensor that says it is on CUDA and a stand-in event record the
    calls; a CPU tensor is copied at once."""
    calls, host = [], torch.ones(2)

    class OnGpu:
        device = torch.device("cuda")

        def to(self, *args, **kwargs):
            calls.append(("to", args, kwargs))
            return host

    class Event:
        def record(self):
            calls.append("record")

        def synchronize(self):
            calls.append("synchronize")

    monkeypatch.setattr(features_lib.torch.cuda, "Event", Event)
    copy = features_lib._ToHost.start(OnGpu())
    assert calls == [("to", ("cpu",), {"non_blocking": True}), "record"]
    assert copy.wait() is host and calls[-1] == "synchronize"
    cpu = torch.zeros(3)
    here = features_lib._ToHost.start(cpu)
    assert here.landed is None and here.wait() is cpu  # already on the CPU: nothing to wait for


class Recorded(Exception):
    """Raised by a stand-in once it has recorded its arguments: the extraction stops there."""


def test_extraction_hands_its_settings_to_the_loader_and_the_model(
    resnet18, images, tmp_path, monkeypatch
):
    loaders, models, threads = [], [], []
    real_loader, real_prepare = features_lib.DataLoader, features_lib.prepare_model

    def loader(dataset, **kwargs):
        loaders.append((dataset, kwargs))
        return real_loader(dataset, **kwargs)

    def prepare(*args):
        models.append(args)
        return real_prepare(*args)

    monkeypatch.setattr(features_lib, "DataLoader", loader)
    monkeypatch.setattr(features_lib, "prepare_model", prepare)
    monkeypatch.setattr(features_lib.torch, "set_num_threads", threads.append)
    out = tmp_path / "not" / "yet" / "f.safetensors"  # folders made as needed
    settings = ExtractSettings(batch_size=2, workers=0, device="cpu", precision="bfloat16")
    paths = dict(zip("abc", images[:3], strict=True))
    start = time.perf_counter()
    result = extract_features(
        resnet18, paths, out, ImageSpec("crop", 64), settings, None, flipped=True
    )
    assert 0 < result.seconds <= time.perf_counter() - start
    ((dataset, kwargs),) = loaders
    assert dataset.flipped and (dataset.mode, dataset.size) == ("crop", 64)
    assert kwargs["batch_size"] == 2 and kwargs["num_workers"] == 0
    assert kwargs["pin_memory"] is False and kwargs["prefetch_factor"] is None
    assert models == [(resnet18, torch.device("cpu"), False, 2, "bfloat16")]
    assert threads == [ONE_PROCESS.threads()] and out.is_file()
    with safe_open(str(out), framework="pt") as handle:
        assert handle.metadata()["flipped"] == "left-right"
    loaders.clear()
    workers = replace(settings, workers=1, precision="auto")
    extract_features(resnet18, paths, out, ImageSpec("crop", 64), workers, None)
    assert loaders[0][1]["prefetch_factor"] == 4 and not loaders[0][0].flipped
    assert models[1][4] == pick_precision("auto", torch.device("cpu"))  # resolved for the CPU

    # On a GPU under torchrun: the process's own GPU, pinned memory (stopped before any copy).
    def stop(*args):
        models.append(args)
        raise Recorded

    monkeypatch.setattr(features_lib, "prepare_model", stop)
    monkeypatch.setattr(features_lib, "pick_device", lambda device, key: torch.device("cuda"))
    monkeypatch.setattr(features_lib, "pick_precision", lambda precision, device: precision)
    ranks = Ranks(rank=1, world=2, local_rank=1, local_world=2)
    for world in (ranks, ONE_PROCESS):
        loaders.clear()
        with pytest.raises(Recorded):
            extract_features(resnet18, paths, out, ImageSpec("crop", 64), settings, None, world)
        assert loaders[0][1]["pin_memory"] is True
    assert [m[1] for m in models[-2:]] == [torch.device("cuda", 1), torch.device("cuda")]
    assert len(threads) == 2  # the two CPU runs' only: on a GPU the CPU's threads are left alone


def test_the_progress_bar_counts_every_image_on_the_main_process_only(
    resnet18, images, tmp_path, monkeypatch, capsys
):
    bad = tmp_path / "bad.jpg"
    bad.write_text("no image")
    paths = {"a": images[0], "bad": bad, "b": images[1]}
    settings = ExtractSettings(batch_size=2, workers=0, on_error="skip")
    extract_features(resnet18, paths, tmp_path / "f.safetensors", ImageSpec("shrink", 64), settings)
    shown = capsys.readouterr().err  # the default label; the skipped image counted
    assert "extract: 100%|" in shown and "| 3/3 [" in shown and "image/s]" in shown
    merged = []
    monkeypatch.setattr(
        features_lib, "_merge_ranks", lambda raw, rows, ranks: merged.append(raw) or rows
    )
    second = Ranks(rank=1, world=2, local_world=1)
    result = extract_features(
        resnet18, paths, tmp_path / "g.safetensors", ImageSpec("shrink", 64), settings, "x", second
    )
    assert capsys.readouterr().err == "" and result.image_ids == ["b"]
    assert merged == [tmp_path / ".g.safetensors.rank1.rows.tmp"]  # this rank's rows
    assert not (tmp_path / "g.safetensors").exists()  # rank 0 writes the file


def test_extraction_failures_name_what_went_wrong(resnet18, tmp_path, monkeypatch):
    bad = tmp_path / "bad.jpg"
    bad.write_text("no image")
    out = tmp_path / "f.safetensors"
    settings = ExtractSettings(workers=0, on_error="skip")
    with pytest.raises(ImageError) as raised:
        extract_features(
            resnet18, {"a": bad, "b": bad}, out, ImageSpec("shrink", 64), settings, "x"
        )
    assert str(raised.value) == "no image of 2 could be decoded (x)"

    def full(*args):  # the disk fills before the rows file exists
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(features_lib, "_write_rows", full)
    with pytest.raises(PipelineError) as raised:
        extract_features(resnet18, {"a": bad}, out, ImageSpec("shrink", 64), settings, None)
    assert str(raised.value) == (
        f"{out}: cannot write features (No space left on device); nothing was kept"
    )
    assert sorted(tmp_path.iterdir()) == [bad]


def test_decoding_workers_by_device(monkeypatch):
    monkeypatch.setattr(devices_lib.os, "cpu_count", lambda: 40)
    pick = devices_lib.pick_workers
    assert pick("auto", torch.device("cpu")) == 1  # the model needs the cores
    assert pick("auto", torch.device("cuda")) == 16 and pick("auto", torch.device("meta")) == 16
    assert pick(3, torch.device("cpu")) == 3 and pick("0", torch.device("cuda")) == 0
    monkeypatch.setattr(devices_lib.os, "cpu_count", lambda: None)
    assert pick("auto", torch.device("cuda")) == 1


class Recorder(torch.nn.Module):
    """A stand-in backbone: records each input and returns its first channel."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)  # a weight whose layout prepare_model sets
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x)
        return x[:, :1]


def recorder_backbone() -> Backbone:
    return Backbone("stand-in", "all", "random", Recorder(), (0.5, 0.25, 0.0), (0.5, 0.5, 0.25))


def test_prepare_model_normalises_pads_short_batches_and_uses_channels_last():
    backbone = recorder_backbone()
    forward = prepare_model(backbone, torch.device("cpu"), batch_size=4)
    module = backbone.module
    assert module.conv.weight.is_contiguous(memory_format=torch.channels_last)
    batch = torch.full((3, 3, 2, 2), 255, dtype=torch.uint8)
    out = forward(batch)
    (seen,) = module.inputs
    assert seen.shape == (4, 3, 2, 2)  # padded to the batch size with zeros
    # (255 - 255 mean) / (255 std) channel by channel
    assert seen[:3, :, 0, 0].tolist() == [[1.0, 1.5, 4.0]] * 3
    assert seen[3].abs().sum() == 0
    assert out.shape == (3, 1, 2, 2) and out.dtype == torch.float32
    module.inputs.clear()
    forward(torch.zeros(4, 3, 2, 2, dtype=torch.uint8))  # a full batch goes as it is
    assert [x.shape[0] for x in module.inputs] == [4]
    auto = prepare_model(recorder_backbone(), torch.device("cpu"), precision="auto")
    assert auto(batch).shape == (3, 1, 2, 2)


def test_compile_goes_through_torch_compile_frozen_and_static(monkeypatch):
    """torch.compile itself runs in test_compiled_path_equals_eager_with_a_padded_last_batch (a
    process of its own); here a stand-in records how it is asked, then fails as inductor can."""
    calls = []

    def compile_(model, **kwargs):
        calls.append(kwargs)
        return lambda x: model(x) * 2

    monkeypatch.setattr(features_lib.torch, "compile", compile_)
    batch = torch.full((2, 3, 2, 2), 255, dtype=torch.uint8)
    eager = prepare_model(recorder_backbone(), torch.device("cpu"))
    assert calls == [] and eager(batch)[0, 0, 0, 0].item() == 1.0
    compiled = prepare_model(recorder_backbone(), torch.device("cpu"), compile=True)
    assert calls == [{"dynamic": False, "options": {"freezing": True}}]
    assert compiled(batch)[0, 0, 0, 0].item() == 2.0

    def failure(inner: Exception) -> str:
        """The message of a compiled model whose compiler fails with `inner`."""

        def failing(model, **kwargs):
            def run(x):
                raise torch._dynamo.exc.BackendCompilerFailed(lambda: None, inner, None)

            return run

        monkeypatch.setattr(features_lib.torch, "compile", failing)
        broken = prepare_model(recorder_backbone(), torch.device("cpu"), compile=True)
        with pytest.raises(PipelineError) as raised:
            broken(batch)
        return str(raised.value)

    assert failure(RuntimeError("inductor: no C++ compiler\nsecond line")) == (
        "backbone.compile: torch.compile failed for stand-in (RuntimeError: inductor: no C++ "
        "compiler); set backbone.compile: false"
    )
    assert failure(RuntimeError("")).endswith("(RuntimeError: ); set backbone.compile: false")
    long = failure(OSError("x" * 300))  # the first 200 characters of the first line
    assert long.endswith(f"(OSError: {'x' * 200}); set backbone.compile: false")


def test_bfloat16_runs_the_backbone_under_bfloat16_autocast(monkeypatch):
    entered = []
    real_autocast = features_lib.torch.autocast

    def autocast(device_type, **kwargs):
        entered.append((device_type, kwargs))
        return real_autocast(device_type, **kwargs)

    monkeypatch.setattr(features_lib.torch, "autocast", autocast)
    batch = torch.zeros(1, 3, 2, 2, dtype=torch.uint8)
    prepare_model(recorder_backbone(), torch.device("cpu"), precision="float32")(batch)
    assert entered == []
    prepare_model(recorder_backbone(), torch.device("cpu"), precision="bfloat16")(batch)
    assert entered == [("cpu", {"dtype": torch.bfloat16})]


def test_the_device_auto_takes_the_gpu_when_there_is_one(monkeypatch):
    for available in (True, False):
        monkeypatch.setattr(devices_lib.torch.cuda, "is_available", lambda a=available: a)
        expected = "cuda" if available else "cpu"
        assert devices_lib.pick_device("auto", "train.device") == torch.device(expected)
        assert devices_lib.pick_device("cpu", "train.device") == torch.device("cpu")
    for key in ("train.device", "finetune.device", "--device"):  # the key at fault is named
        with pytest.raises(ParamsError) as raised:
            devices_lib.pick_device("cuda", key)
        assert str(raised.value) == f"{key}: cuda, but torch sees no GPU (use auto or cpu)"
    bb = load_params(REPO / "params.yaml").backbone
    with pytest.raises(ParamsError, match=r"^backbone.device: cuda, but torch sees no GPU"):
        ExtractSettings.from_params(replace(bb, device="cuda"), "raise")
    settings = ExtractSettings.from_params(replace(bb, device="auto"), "raise")
    assert settings.device == "cpu"  # resolved once, for the stage and the loop alike
    monkeypatch.setattr(devices_lib.torch.cuda, "is_available", lambda: True)
    assert devices_lib.pick_device("cuda", "train.device") == torch.device("cuda")
