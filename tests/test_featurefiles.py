"""Feature files (features/featurefiles.py): the streamed file is the file safetensors writes, rows
read lazily equal the loaded tensor (and train the same model), and unreadable files say why."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline_lib.base.errors import PipelineError
from pipeline_lib.features import featurefiles
from pipeline_lib.features.featurefiles import read_features

REPO = Path(__file__).resolve().parents[1]


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

    from pipeline_lib.models.losses import Objective
    from pipeline_lib.training.loop import Dataset, TrainConfig, fit

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
