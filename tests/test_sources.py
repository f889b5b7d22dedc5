"""Which reader data.source uses (data/sources.py): the folder each reads, the class names, the
splits, the download only when asked, and what dataset.json records; the readers stand in here
(their own tests read real files: test_voc.py, test_coco.py, test_synthetic.py)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from pipeline_lib.base.params import load_params
from pipeline_lib.data import sources
from pipeline_lib.data.voc import VOC_CLASSES

REPO = Path(__file__).resolve().parents[1]
ROWS = object()  # what a reader returns, handed on untouched


@pytest.fixture
def calls(monkeypatch) -> list[tuple]:
    seen: list[tuple] = []

    def read_voc(folder, splits, classes, on_error):
        seen.append(("voc", folder, splits, classes, on_error))
        return ROWS

    def read_coco(folder, splits, on_error):
        seen.append(("coco", folder, splits, on_error))
        return ROWS, ["a", "b"], [7, 9]

    monkeypatch.setattr(sources, "read_voc", read_voc)
    monkeypatch.setattr(sources, "read_coco", read_coco)
    monkeypatch.setattr(sources, "download_voc2012", lambda parent: seen.append(("get", parent)))
    return seen


def data(**changes):
    base = load_params(REPO / "params.yaml").data
    return replace(base, train_split="tr", val_split="va", on_error="skip", **changes)


def test_the_synthetic_source_reads_the_generated_folder_with_its_classes(calls):
    source = sources.read_source(data(source="synthetic"), Path("data/synthetic"))
    classes = list(data().synthetic.classes)
    assert calls == [("voc", Path("data/synthetic"), {"train": "tr", "val": "va"}, classes, "skip")]
    assert source.rows is ROWS and source.classes == classes
    assert source.info == {
        "source": "synthetic",
        "dataset_dir": "data/synthetic",
        "classes": classes,
        "splits": {"train": "tr", "val": "va"},
    }


def test_voc_reads_root_and_year_and_downloads_only_when_asked(calls):
    source = sources.read_source(data(source="voc", root="/v/VOCdevkit", year=2007), Path("x"))
    assert calls == [
        (
            "voc",
            Path("/v/VOCdevkit/VOC2007"),
            {"train": "tr", "val": "va"},
            list(VOC_CLASSES),
            "skip",
        )
    ]
    assert source.dataset_dir == Path("/v/VOCdevkit/VOC2007") and source.classes == list(
        VOC_CLASSES
    )
    calls.clear()
    sources.read_source(
        data(source="voc", root="/v/VOCdevkit", year=2012, download=True), Path("x")
    )
    assert calls[0] == ("get", Path("/v")) and calls[1][1] == Path("/v/VOCdevkit/VOC2012")


def test_coco_records_its_category_ids(calls):
    source = sources.read_source(data(source="coco", root="/c"), Path("x"))
    assert calls == [("coco", Path("/c"), {"train": "tr", "val": "va"}, "skip")]
    assert source.classes == ["a", "b"] and source.info["coco_category_ids"] == [7, 9]
    assert source.info["dataset_dir"] == "/c"
