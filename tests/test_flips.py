"""Horizontal flips without leaving the cache: the training images' flipped features extracted
beside the originals (backbone.hflip), boxes mirrored, and each epoch's batches taking a flipped
image in place of its original with probability train.hflip (or the cached maps mirrored)."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml
from conftest import invoke

from pipeline_lib.base.errors import PipelineError
from pipeline_lib.base.params import parse_params
from pipeline_lib.boxes.geometry import decode_boxes, encode_boxes, mirror_encoded, pixel_fraction
from pipeline_lib.features.backbones import (
    load_backbone,
    mirror_features,
    pack_levels,
    unpack_levels,
)
from pipeline_lib.features.devices import prepare_model
from pipeline_lib.features.featurefiles import read_features
from pipeline_lib.features.images import load_image_tensor
from pipeline_lib.training.loop import Dataset, Flips
from pipeline_lib.training.tasks import grid_task, read_training_inputs, single_task


def test_mirrored_boxes_by_hand():
    # continuous coordinates 10..30 of a 100-wide image are 70..90 once flipped (100 - x)
    box = torch.tensor([[10.0, 5.0, 30.0, 25.0]], dtype=torch.float64)
    mirrored = mirror_encoded(encode_boxes(box, 100, 50))
    assert decode_boxes(mirrored, 100, 50)[0].tolist() == pytest.approx([70.0, 5.0, 90.0, 25.0])
    assert torch.allclose(mirror_encoded(mirrored), encode_boxes(box, 100, 50))  # its own inverse
    # VOC's columns 10..30 (1-based, inclusive) are columns 71..91 once flipped (100 + 1 - x)
    voc = mirror_encoded(encode_boxes(box, 100, 50), pixel=1 / 100)
    assert decode_boxes(voc, 100, 50)[0].tolist() == pytest.approx([71.0, 5.0, 91.0, 25.0])
    assert torch.allclose(mirror_encoded(voc, 1 / 100), encode_boxes(box, 100, 50))
    assert pixel_fraction(200, "shrink", 100) == pixel_fraction(200, "none", 0) == 1 / 200
    assert pixel_fraction(200, "crop", 100) == 1 / 100  # crop keeps the pixels


def test_mirrored_maps_flip_each_level():
    coarse, fine = torch.randn(2, 5, 3, 4), torch.randn(2, 2, 6, 8)
    packed = mirror_features(pack_levels(coarse, fine), fine_channels=2)
    mirrored_coarse, mirrored_fine = unpack_levels(packed, 2)
    assert torch.equal(mirrored_coarse, coarse.flip(-1))
    assert torch.equal(mirrored_fine, fine.flip(-1))
    assert torch.equal(mirror_features(coarse), coarse.flip(-1))


def flips_dataset(probability: float, extracted: bool) -> Dataset:
    """Rows 0..5 whose features and target are their number + 1; flipped ones are negated."""
    n = torch.arange(1.0, 7.0)
    features = n.view(6, 1, 1, 1).expand(6, 1, 1, 2).contiguous()
    flips = Flips(
        probability,
        (-n,),
        torch.Generator().manual_seed(0),
        features=-features if extracted else None,
        mirror=None if extracted else lambda x: x * torch.tensor([10.0, 100.0]),
    )
    return Dataset(features, (n,), flips)


@pytest.mark.parametrize("extracted", [True, False])
def test_a_shuffled_batch_takes_flipped_rows_with_their_targets(extracted):
    order = torch.tensor([4, 1, 5, 0, 2, 3])
    value = order.float() + 1
    (x, (t,)), *_ = flips_dataset(0.0, extracted).batches(6, order)
    assert t.tolist() == value.tolist() and x[:, 0, 0, 0].tolist() == value.tolist()
    (x, (t,)), *_ = flips_dataset(1.0, extracted).batches(6, order)
    assert t.tolist() == (-value).tolist()  # each row's own flipped target
    assert x[:, 0, 0, 0].tolist() == (-value if extracted else value * 10).tolist()
    if not extracted:
        assert x[:, 0, 0, 1].tolist() == (value * 100).tolist()
    # about half at 0.5, drawn anew for each batch; unshuffled batches (evaluation) never flip
    dataset = flips_dataset(0.5, extracted)
    drawn = [int((t < 0).sum()) for _ in range(50) for _, (t,) in dataset.batches(6, order)]
    assert 120 < sum(drawn) < 180 and len(set(drawn)) > 2
    assert all((t >= 0).all() for _, (t,) in dataset.batches(3))


def test_flipped_extraction_is_the_backbone_on_the_flipped_image(trained, tmp_path, monkeypatch):
    """The extract stage with backbone.hflip: train_flipped.safetensors holds the training images
    flipped after the image mode, in train.safetensors' order; training reads it."""
    from stages import extract, train

    folder = tmp_path / "project"
    shutil.copytree(trained, folder, ignore=shutil.ignore_patterns("reports"))
    params = yaml.safe_load((folder / "params.yaml").read_text())
    params["backbone"].update(hflip=True, precision="float32")
    params["train"].update(hflip=1.0, epochs=1)
    params["head"]["grid_kind"] = "conv"  # cell targets: the objectness map moves with a flip
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(folder)
    invoke(extract.app, [])
    flipped = read_features("data/features/train_flipped.safetensors")
    original = read_features("data/features/train.safetensors")
    assert flipped.image_ids == original.image_ids and flipped.metadata["flipped"] == "left-right"
    assert not (folder / "data/features/val_flipped.safetensors").exists()
    inputs = read_training_inputs(folder / "data/prepared", folder / "data/features")
    path = inputs.prepared.images.set_index("image_id").loc[flipped.image_ids[0], "path"]
    dataset_dir = folder / inputs.prepared.info["dataset_dir"]
    pixels = load_image_tensor(dataset_dir / path, "shrink", 448)
    forward = prepare_model(load_backbone("efficientnet_lite0"), torch.device("cpu"))
    direct = forward(pixels.flip(-1)[None])[0].half()
    assert torch.allclose(flipped.features[0].float(), direct.float(), atol=1e-2)
    assert not torch.allclose(flipped.features[0].float(), original.features[0].float(), atol=0.1)
    # the tasks take it, with mirrored targets; training runs with it
    raw = parse_params(params)
    task = grid_task(inputs, raw)
    flips = task.data["train"].flips
    assert flips.probability == 1.0 and flips.features is not None and flips.mirror is None
    has_obj, mirrored_has_obj = task.data["train"].targets[1], flips.targets[1]
    assert mirrored_has_obj.sum() > 0 and not torch.equal(mirrored_has_obj, has_obj)
    single = single_task(inputs, raw).data["train"]
    # the largest object's centre mirrored as VOC's pixels are (x -> W + 1 - x, W the photo's
    # width under shrink): cx -> 1 + 1 / W - cx
    widths = inputs.prepared.images.set_index("image_id").loc[original.image_ids, "width"]
    sums = single.flips.targets[0][:, 0].double() + single.targets[0][:, 0].double()
    assert sums.tolist() == pytest.approx([1 + 1 / w for w in widths], abs=1e-6)
    invoke(train.app, ["multi", "--no-progress"])


def test_extracted_flips_need_the_flipped_features(trained):
    params = yaml.safe_load((trained / "params.yaml").read_text())
    params["train"].update(hflip=0.5, hflip_from="extracted")
    inputs = read_training_inputs(trained / "data/prepared", trained / "data/features")
    with pytest.raises(PipelineError, match="set backbone.hflip: true"):
        grid_task(inputs, parse_params(params))
    params["train"]["hflip_from"] = "mirrored"
    flips = grid_task(inputs, parse_params(params)).data["train"].flips
    assert flips.features is None and flips.probability == 0.5
    x = torch.randn(2, 320, 14, 14)
    assert torch.equal(flips.mirror(x), x.flip(-1))
