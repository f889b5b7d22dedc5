"""Shared fixtures: the repository's params, the genuine VOC2007 subset, small VOC folders, and a
folder where the real stages trained tiny models (`trained`)."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
SHARED_VOC = REPO.parent / "shared" / "voc" / "VOCdevkit" / "VOC2007"


@pytest.fixture
def raw_params() -> dict:
    """params.yaml as a plain dict (a fresh copy to modify)."""
    return copy.deepcopy(yaml.safe_load((REPO / "params.yaml").read_text()))


@pytest.fixture(scope="session")
def shared_voc() -> Path:
    if not (SHARED_VOC / "Annotations").is_dir():
        pytest.skip(f"genuine VOC2007 subset not found at {SHARED_VOC} (it ships beside the repo)")
    return SHARED_VOC


def voc_xml(filename="a.jpg", width=100, height=80, objects=("<object><name>cat</name>"
            "<bndbox><xmin>10</xmin><ymin>20</ymin><xmax>50</xmax><ymax>60</ymax></bndbox>"
            "</object>",), extra="") -> str:  # fmt: skip
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


@pytest.fixture
def voc_folder(tmp_path) -> VocFolder:
    return VocFolder(tmp_path / "VOCdevkit" / "VOC2007")


def tiny_params(params: dict, n_train: int = 8, n_val: int = 4, epochs: int = 2,
                max_side: int = 128) -> dict:  # fmt: skip
    """`params` (params.yaml as a dict) shrunk for tests, in place: a few small synthetic images,
    tiny heads, few epochs, one sample per figure. Returns it."""
    params["data"]["synthetic"].update(n_train=n_train, n_val=n_val, min_side=96,
                                       max_side=max_side)  # fmt: skip
    params["report"].update(samples=1, mode_samples=1)
    params["backbone"].update(batch_size=8, workers=0)
    params["head"].update(hidden=16, grid_hidden=16)
    params["train"].update(epochs=epochs, batch_size=4)
    params["eval"].update(samples=1)
    return params


def invoke(app, args: list[str]):
    """Run a Typer app in-process; it must succeed."""
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Path:
    """A folder where the real stages made a tiny dataset, Lite0 features and both models."""
    folder = tmp_path_factory.mktemp("trained")
    params = tiny_params(yaml.safe_load((REPO / "params.yaml").read_text()), 12, 5, max_side=200)
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
