"""Shared fixtures: the repository's params, the genuine VOC2007 subset, small VOC folders, and a
folder where the real stages trained tiny models (`trained`)."""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from PIL import Image, ImageDraw
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
TIMING_KEYS = {"seconds", "seconds_per_epoch", "images_per_second", "wall_seconds"}
# backbone.precision of the projects the end-to-end tests build (tiny_params, the genuine-VOC
# chain): auto as params.yaml has it; `TEST_PRECISION=float32 make test` plays, on a CPU with
# AVX-512 BF16, one without it (docs/testing.md).
TEST_PRECISION = os.environ.get("TEST_PRECISION", "auto")
# The genuine VOC2007 subset ships beside the clone; VOC2007_DIR points elsewhere (mutation runs
# test a copy of the repository in mutants/, one folder further down).
SHARED_VOC = Path(
    os.environ.get("VOC2007_DIR", REPO.parent / "shared" / "voc" / "VOCdevkit" / "VOC2007")
)


def pytest_configure(config):
    """Under pytest-xdist, each worker (and every stage or dvc process it starts) gets its share
    of the cores as torch's thread count: two workers that each ran one thread per core would
    oversubscribe the cores, and torch's spinning threads then run several times slower."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(workers)))


def pytest_collection_modifyitems(items):
    """Tests that use the `trained` fixture run the real stages: mark them `stages`; those in
    tests/e2e/ run the real dvc CLI or stage processes: mark them `e2e`.

    (`make test` runs the suite in two pytest-xdist processes with `--dist loadscope`: each
    module runs in one process, in order, so that a module whose tests share a module-scoped
    project builds it once and each test starts from the state the one before left;
    `built_once` fails a run where that does not hold.)"""
    for item in items:
        if "trained" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.stages)
        if "e2e" in Path(item.path).relative_to(REPO / "tests").parts[:-1]:
            item.add_marker(pytest.mark.e2e)


def built_once(tmp_path_factory, name: str) -> None:
    """Called by a module-scoped fixture that builds a project its module's tests share: fails
    when `name` is built a second time in this run, by another pytest-xdist process or after its
    module's fixtures were torn down. Its tests then ran apart, each paying for a project of its
    own (`--dist loadgroup` silently stopped grouping with pytest 9.2: pytest-xdist issue #1386;
    `make test` uses `--dist loadscope`, one module to a process)."""
    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID")  # the same in every worker of one run
    base = tmp_path_factory.getbasetemp()
    folder = base.parent / f"built-{run_id}" if run_id else base / "built"
    folder.mkdir(exist_ok=True)
    try:
        (folder / name).touch(exist_ok=False)
    except FileExistsError:
        pytest.fail(
            f"the project of {name} is built a second time in this run: its module's tests ran "
            "in more than one pytest-xdist process (run them with --dist loadscope)"
        )


def with_param(raw: dict, key: str, value) -> dict:
    """A copy of params `raw` (params.yaml as a dict) with the dotted `key` set to `value`."""
    changed = copy.deepcopy(raw)
    *groups, name = key.split(".")
    node = changed
    for group in groups:
        node = node[group]
    node[name] = value
    return changed


@pytest.fixture
def raw_params() -> dict:
    """params.yaml as a plain dict (a fresh copy to modify)."""
    return copy.deepcopy(yaml.safe_load((REPO / "params.yaml").read_text()))


@pytest.fixture(scope="session")
def shared_voc() -> Path:
    if not (SHARED_VOC / "Annotations").is_dir():
        pytest.skip(f"genuine VOC2007 subset not found at {SHARED_VOC} (it ships beside the repo)")
    return SHARED_VOC


def voc_xml(
    filename="a.jpg",
    width=100,
    height=80,
    objects=(
        "<object><name>cat</name>"
        "<bndbox><xmin>10</xmin><ymin>20</ymin><xmax>50</xmax><ymax>60</ymax></bndbox>"
        "</object>",
    ),
    extra="",
) -> str:
    """A small VOC annotation; `objects` are raw <object> XML snippets."""
    return (
        f"<annotation><filename>{filename}</filename>"
        f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"
        f"<segmented>0</segmented>{extra}{''.join(objects)}</annotation>"
    )


class VocFolder:
    """Builds a tiny dataset folder: Annotations/, JPEGImages/, ImageSets/Main/."""

    def __init__(self, root: Path):
        self.root = root
        for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
            (root / sub).mkdir(parents=True, exist_ok=True)

    def add(self, image_id: str, xml: str | None = None, size=(100, 80), image=True) -> None:
        if xml is not None:
            (self.root / "Annotations" / f"{image_id}.xml").write_text(xml)
        if image:
            Image.new("RGB", size, (90, 120, 200)).save(
                self.root / "JPEGImages" / f"{image_id}.jpg"
            )

    def split(self, name: str, ids: list[str]) -> None:
        (self.root / "ImageSets" / "Main" / f"{name}.txt").write_text(
            "".join(f"{i}\n" for i in ids)
        )


def write_tiny_voc(root: Path, splits: dict[str, int], seed: int = 0) -> None:
    """A small VOC2007-style folder with genuine VOC class names (`splits`: list name -> images):
    one or two filled rectangles of a class colour per noisy photo, in VOC's 1-based pixels."""
    colours = {"cat": (220, 60, 60), "dog": (60, 200, 80), "car": (60, 90, 220)}
    rng = random.Random(seed)
    folder, n = VocFolder(root), 0
    for split, count in splits.items():
        ids = [f"{n + k:06d}" for k in range(count)]
        n += count
        for image_id in ids:
            width, height = rng.randint(96, 140), rng.randint(96, 140)
            image = Image.effect_noise((width, height), 40).convert("RGB")
            draw, objects = ImageDraw.Draw(image), []
            for _ in range(rng.randint(1, 2)):
                name = rng.choice(sorted(colours))
                x0, y0 = rng.randint(1, width // 2), rng.randint(1, height // 2)
                x1, y1 = rng.randint(x0 + 16, width), rng.randint(y0 + 16, height)
                draw.rectangle([x0 - 1, y0 - 1, x1 - 1, y1 - 1], fill=colours[name])
                box = f"<xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax>"
                objects.append(f"<object><name>{name}</name><bndbox>{box}</bndbox></object>")
            image.save(folder.root / "JPEGImages" / f"{image_id}.jpg", quality=90)
            xml = voc_xml(f"{image_id}.jpg", width, height, objects)
            (folder.root / "Annotations" / f"{image_id}.xml").write_text(xml)
        folder.split(split, ids)


@pytest.fixture
def voc_folder(tmp_path) -> VocFolder:
    return VocFolder(tmp_path / "VOCdevkit" / "VOC2007")


def tiny_params(
    params: dict, n_train: int = 8, n_val: int = 4, epochs: int = 2, max_side: int = 128
) -> dict:
    """`params` (params.yaml as a dict) shrunk for tests, in place: a few small synthetic images,
    tiny heads, few epochs, one sample per figure, the backbone in TEST_PRECISION. Returns it."""
    params["data"]["synthetic"].update(n_train=n_train, n_val=n_val, min_side=96, max_side=max_side)
    params["report"].update(samples=1, mode_samples=1)
    params["backbone"].update(batch_size=8, workers=0, precision=TEST_PRECISION)
    params["head"].update(hidden=16, grid_hidden=16, conv_width=16)
    params["train"].update(epochs=epochs, batch_size=4)
    params["eval"].update(samples=1, score_threshold=0.0)  # 2-epoch heads score low
    return params


def lab_heads(params: dict) -> dict:
    """`params` (params.yaml as a dict) set, in place, to the lab's heads and training (what the
    defaults were formerly; the image size and backbone layer stay). Returns it."""
    params["head"].update(single_kind="lab", grid_kind="lab", dropout=0.5)
    params["grid"].update(num_cells=7, assign="centre")
    params["train"].update(
        lr_schedule="constant",
        monitor="box_loss_plus_error",
        box_loss="smooth_l1",
        obj_loss="bce",
        obj_target="binary",
        warmup_epochs=0.0,
    )
    return params


@contextmanager
def environment_kept():
    """Restores os.environ on exit. The train stage pins the CPU kernels by setting
    ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA in its own process, which is this one when a test
    runs a stage in-process: left set, every later `dvc` or stage process of the suite would run
    AVX2-only oneDNN (bfloat16 extraction ~10x slower here) and test other kernels than it says."""
    saved = dict(os.environ)
    try:
        yield
    finally:  # only what changed: other threads may be reading the environment
        for key in set(os.environ) - set(saved):
            del os.environ[key]
        for key, value in saved.items():
            if os.environ.get(key) != value:
                os.environ[key] = value


@pytest.fixture(autouse=True)
def _environment_restored():
    with environment_kept():
        yield


def invoke(app, args: list[str]):
    """Run a Typer app in-process (the environment restored after it); it must succeed."""
    with environment_kept():
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Path:
    """A folder where the real stages made a tiny dataset, Lite0 features and both models."""
    folder = tmp_path_factory.mktemp("trained")
    params = tiny_params(yaml.safe_load((REPO / "params.yaml").read_text()), 12, 5, max_side=200)
    # float32 on every machine, whatever auto would pick: the same features everywhere, and fast
    # on every CPU (bfloat16 emulated where the CPU lacks it is 6x slower). That predict runs the
    # precision recorded with the features, not auto's, is test_inference's to check, both ways.
    params["backbone"]["precision"] = "float32"
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    from stages import extract, prepare, synthesize, train  # only when a test needs models

    cwd = Path.cwd()
    os.chdir(folder)
    try:
        invoke(synthesize.app, ["--workers", "1"])
        invoke(prepare.app, [])
        invoke(extract.app, [])
        invoke(train.app, ["single", "--no-progress"])
        invoke(train.app, ["multi", "--no-progress"])
    finally:
        os.chdir(cwd)
    return folder


def evaluate_multi_and_predict(folder: Path) -> tuple[dict, list[dict]]:
    """In `folder` (the working directory, trained): the evaluate_multi stage, then predict at
    score 0 on one of its synthetic photos. Returns (the metrics, predict's detections)."""
    from stages import evaluate, predict

    invoke(evaluate.app, ["multi"])
    metrics = json.loads((folder / "reports/evaluate_multi/metrics.json").read_text())
    image = next((folder / "data/synthetic").rglob("*.jpg"))
    invoke(predict.app, [str(image), "--out", "out", "--format", "json", "--score", "0.0"])
    return metrics, json.loads((folder / "out/detections.json").read_text())


def without_timings(value):
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in TIMING_KEYS}
    return value


def snapshot(root: Path) -> dict:
    """Every metrics file of a pipeline run (timings left out) and the hash of every cached output
    in its dvc.lock (data and models; the report files hold timings)."""
    metrics = {
        str(path.relative_to(root)): without_timings(json.loads(path.read_text()))
        for path in sorted((root / "reports").glob("*/metrics.json"))
    }
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    outs = {
        out["path"]: out["md5"]
        for stage in lock["stages"].values()
        for out in stage.get("outs", [])
        if not out["path"].startswith("reports/")
    }
    return {"metrics": metrics, "outs": outs}


def run(cwd: Path, *args: str) -> str:
    """Run a command line (dvc, git, python ...) of the end-to-end tests in `cwd`, with this
    environment's `dvc` and `python` first on PATH; it must succeed. Returns its output."""
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{output}"
    return output
