"""The `synthesize` and `prepare` stage scripts, run in a scratch folder as DVC would run them."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from conftest import VocFolder, voc_xml
from typer.testing import CliRunner

from stages import prepare, synthesize

runner = CliRunner()


@pytest.fixture
def workdir(tmp_path, monkeypatch, raw_params):
    """A scratch working directory with a tiny params.yaml; returns (folder, params dict)."""
    monkeypatch.chdir(tmp_path)
    raw_params["data"]["synthetic"].update(n_train=10, n_val=4, min_side=96, max_side=160)
    raw_params["report"].update(samples=4, mode_samples=2)
    return tmp_path, raw_params


def write_params(folder, raw):
    (folder / "params.yaml").write_text(yaml.safe_dump(raw))


def object_counts(annotations_dir, ids):
    """Independent count of <object> elements (not <part>) straight from the XML text."""
    return sum(
        len(re.findall(r"<object>", (annotations_dir / f"{i}.xml").read_text())) for i in ids
    )


def test_synthetic_default_chain(workdir):
    folder, raw = workdir
    write_params(folder, raw)
    result = runner.invoke(synthesize.app, ["--workers", "1"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(prepare.app, [])
    assert result.exit_code == 0, result.output

    dataset = folder / "data/synthetic/VOCdevkit/VOCshapes"
    lists = {s: (dataset / f"ImageSets/Main/{s}.txt").read_text().split() for s in ("train", "val")}
    metrics = json.loads((folder / "reports/prepare/metrics.json").read_text())
    per_class = json.loads((folder / "reports/prepare/objects_per_class.json").read_text())
    for split, ids in lists.items():
        assert metrics[split]["images"] == len(ids)
        assert metrics[split]["objects"] == object_counts(dataset / "Annotations", ids)
        assert metrics[split]["skipped"] == 0
        mine = [r for r in per_class if r["split"] == split]
        assert {r["class"] for r in mine} == set(raw["data"]["synthetic"]["classes"])
        assert sum(r["objects"] for r in mine) == object_counts(dataset / "Annotations", ids)
    info = json.loads((folder / "data/prepared/dataset.json").read_text())
    assert info["classes"] == raw["data"]["synthetic"]["classes"]
    figures = sorted(p.name for p in (folder / "reports/prepare/figures").iterdir())
    assert figures == [
        "class_counts.png",
        "modes_train.png",
        "modes_val.png",
        "samples_train.png",
        "samples_val.png",
        "sizes_train.png",
        "sizes_val.png",
    ]
    assert all(p.stat().st_size < 1_000_000 for p in (folder / "reports/prepare/figures").iterdir())
    assert json.loads((folder / "reports/prepare/skipped.json").read_text()) == []


def voc_params(folder, raw, on_error):
    voc = VocFolder(folder / "VOCdevkit" / "VOC2007")
    dog = (
        "<object><name>dog</name><bndbox><xmin>5</xmin><ymin>5</ymin><xmax>40</xmax>"
        "<ymax>30</ymax></bndbox></object>"
    )
    for image_id in ("a", "b", "c"):
        voc.add(image_id, voc_xml(f"{image_id}.jpg", objects=[dog]))
    voc.add("bad", voc_xml("bad.jpg", objects=[dog.replace("dog", "dragon")]))
    voc.split("train", ["a", "bad", "b"])
    voc.split("val", ["c"])
    raw["data"].update(source="voc", root=str(folder / "VOCdevkit"), year=2007, on_error=on_error)
    write_params(folder, raw)


def test_voc_skip_counts_and_lists_bad_images(workdir):
    folder, raw = workdir
    voc_params(folder, raw, "skip")
    result = runner.invoke(prepare.app, [])
    assert result.exit_code == 0, result.output
    metrics = json.loads((folder / "reports/prepare/metrics.json").read_text())
    assert (metrics["train"]["images"], metrics["train"]["skipped"]) == (2, 1)
    rows = json.loads((folder / "reports/prepare/objects_per_class.json").read_text())
    assert {"split": "train", "class": "dog", "objects": 2} in rows
    assert "objects_per_class" not in metrics["train"]  # a table, not DVC metrics
    assert metrics["val"]["images"] == 1
    [skipped] = json.loads((folder / "reports/prepare/skipped.json").read_text())
    assert skipped["image_id"] == "bad"
    assert "bad.xml: object[0]/name: unknown class 'dragon'" in skipped["reason"]
    assert "skipped 1 images" in result.output


def test_voc_raise_names_the_file_and_writes_nothing(workdir):
    folder, raw = workdir
    voc_params(folder, raw, "raise")
    result = runner.invoke(prepare.app, [])
    assert result.exit_code == 1
    assert re.search(r"error: .*bad\.xml: object\[0\]/name: unknown class 'dragon'", result.output)
    assert not (folder / "data" / "prepared").exists()
    assert not (folder / "reports").exists()


def test_invalid_params_fail_before_any_work(workdir):
    folder, raw = workdir
    raw["head"]["dropout"] = 1.5
    write_params(folder, raw)
    for app in (synthesize.app, prepare.app):
        result = runner.invoke(app, [])
        assert result.exit_code == 1
        assert "params.yaml: head.dropout: Input should be less than 1 (got 1.5)" in result.output
    assert list(folder.iterdir()) == [folder / "params.yaml"]


def test_extract_without_prepared_tables_says_what_to_run(workdir):
    from stages import extract

    folder, raw = workdir
    write_params(folder, raw)
    result = runner.invoke(extract.app, [])
    assert result.exit_code == 1
    assert "no prepared tables" in result.output and "dvc repro prepare" in result.output


def test_train_and_evaluate_say_what_is_missing(workdir):
    from stages import evaluate, train

    folder, raw = workdir
    write_params(folder, raw)
    result = runner.invoke(train.app, ["single"])
    assert result.exit_code == 1 and "no prepared tables" in result.output
    result = runner.invoke(evaluate.app, ["single"])
    assert result.exit_code == 1
    assert (
        "models/single.safetensors: no such model file (run the train stage first)" in result.output
    )
    assert "Traceback" not in result.output
