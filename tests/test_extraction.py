"""The extraction loop (features/extraction.py): file layout, equality with a plain forward pass,
bad images, interruption, time by part, several processes, what it hands the loader and model."""

from __future__ import annotations

import json
import os
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
from torchvision.transforms.v2 import functional as F

from pipeline_lib.base.distributed import ONE_PROCESS, Ranks
from pipeline_lib.base.errors import PipelineError
from pipeline_lib.base.params import ParamsError, load_params
from pipeline_lib.boxes.geometry import ImageSpec
from pipeline_lib.features import devices as devices_lib
from pipeline_lib.features import extraction as features_lib
from pipeline_lib.features import images as images_lib
from pipeline_lib.features.backbones import load_backbone
from pipeline_lib.features.devices import pick_precision, prepare_model
from pipeline_lib.features.extraction import ExtractResult, ExtractSettings, extract_features
from pipeline_lib.features.featurefiles import read_features
from pipeline_lib.features.images import ImageError, load_image_tensor

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


COMPILED_VS_EAGER = """
import sys
from pathlib import Path
import torch
from torch import nn
from pipeline_lib.features.backbones import Backbone
from pipeline_lib.features.extraction import ExtractSettings, extract_features
from pipeline_lib.boxes.geometry import ImageSpec
out, images = Path(sys.argv[1]), sys.argv[2:]
torch.manual_seed(0)
# a small trunk of what backbones are made of (convolutions, BatchNorm, ReLU6, pooling): what the
# compiled path does to the model (freezing, the padded last batch) does not depend on its size,
# and a cold torch.compile of squeezenet took 30 s of the suite
trunk = nn.Sequential(
    nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
    nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU6(), nn.MaxPool2d(2),
).eval()
backbone = Backbone("trunk", "features", "random", trunk, (0.5,) * 3, (0.25,) * 3)
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
    had run other tests' torch work before (OpenMP state shared with them). Without
    ATEN_CPU_CAPABILITY, should the suite run capped (docs/testing.md): compiled under a cap below
    the CPU's own, torch computes garbage, which prepare_model refuses (test_devices)."""
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    subprocess.run(
        [sys.executable, "-c", COMPILED_VS_EAGER, str(tmp_path), *map(str, images)],
        cwd=REPO,
        check=True,
        timeout=600,
        env=env,
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
    assert threads == [] and out.is_file()  # one process: torch's threads (OMP_NUM_THREADS)
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
    assert threads == []  # on a GPU the CPU's threads are left alone
    # On the CPU under torchrun: this process's share of the cores.
    monkeypatch.setattr(features_lib, "pick_device", lambda device, key: torch.device("cpu"))
    with pytest.raises(Recorded):
        extract_features(resnet18, paths, out, ImageSpec("crop", 64), settings, None, ranks)
    assert threads == [ranks.threads()]


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
