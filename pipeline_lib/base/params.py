"""Typed parameters: the one place where params.yaml is read and validated.

Every group of params.yaml is a frozen dataclass below. Types, ranges and allowed values are
checked by pydantic (strictly: `0.3` is not accepted where an int is expected, `"yes"` is not a
bool), unknown and missing keys are refused, and every problem is reported with its dotted key:

    params.yaml: head.dropout: Input should be less than 1 (got 1.5)
    params.yaml: image.mode: Input should be 'none', 'shrink' or 'crop' (got 'zoom')

so that a stage fails before it does any work. Rules that combine keys of several groups
(`combined_problems`: a second feature level and the image size, FCOS and anchors, ...) are
checked here too, each line naming the keys:

    params.yaml: grid.anchors: 2: head.grid_kind fcos predicts one box per location, ...
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import ConfigDict, Field, Strict, TypeAdapter, ValidationError, model_validator
from pydantic.dataclasses import dataclass

from pipeline_lib.base.errors import PipelineError

_STRICT = ConfigDict(extra="forbid")
T = TypeVar("T")
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"  # class and split names: no paths, no spaces

# Strict scalars: YAML's `0.3` is no int, `"yes"` no bool (an int is still a valid float).
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]
Probability = Annotated[Float, Field(ge=0.0, lt=1.0)]
Share = Annotated[Float, Field(ge=0.0, le=1.0)]
PositiveInt = Annotated[Int, Field(gt=0)]
PositiveFloat = Annotated[Float, Field(gt=0.0)]
Name = Annotated[Str, Field(pattern=_NAME)]
Shape = Literal["circle", "square", "triangle", "star", "hexagon", "cross"]  # see synthetic.py


# Backbones and their feature layers (implemented in backbones.py). The first layer is what
# `backbone.layer: auto` picks: the backbone's last feature map, as timm's `features_only` models
# give it (EfficientNet-Lite's 1x1 `head` conv to 1280 channels belongs to the classifier: on
# VOC2007 and the synthetic set the heads detect better on the 320-channel `blocks` map,
# docs/ablations.md).
AUTO_LAYER = "auto"
_RESNET_LAYERS = ("layer4", "layer3")
BACKBONE_LAYERS = {
    "efficientnet_lite0": ("blocks", "head"),  # 320-channel last block / 1280-channel head conv
    "efficientnet_lite1": ("blocks", "head"),  # the same, deeper
    "efficientnet_lite2": ("blocks", "head"),  # 352 / 1280 channels, deeper and wider
    "resnet18": _RESNET_LAYERS,
    "resnet34": _RESNET_LAYERS,
    "resnet50": _RESNET_LAYERS,
    "resnet101": _RESNET_LAYERS,
    "resnet152": _RESNET_LAYERS,
    "densenet121": ("features",),
    "squeezenet1_1": ("features",),
    "mobilenet_v3_large": ("features",),
    "efficientnet_b0": ("features",),
    "convnext_tiny": ("features",),
}


# A second, finer feature level (stride 16, twice the main map's side) for multi-scale grids:
# a unit of the backbone (see backbones.backbone_units), with the default `layer` only.
FINE_LAYERS = {
    **{f"efficientnet_lite{n}": "blocks.4" for n in (0, 1, 2)},
    **{f"resnet{d}": "layer3" for d in (18, 34, 50, 101, 152)},
}


class ParamsError(PipelineError, ValueError):
    """params.yaml is unreadable or a value in it is not allowed (the message names the key)."""


@dataclass(frozen=True, config=_STRICT)
class SyntheticParams:
    seed: Annotated[Int, Field(ge=0)]
    n_train: PositiveInt
    n_val: PositiveInt
    classes: Annotated[list[Shape], Field(min_length=1)]
    min_side: Annotated[Int, Field(ge=32, le=4096)]
    max_side: Annotated[Int, Field(ge=32, le=4096)]
    max_objects: Annotated[Int, Field(ge=1, le=50)]
    difficult_below: Annotated[Int, Field(ge=0)]

    @model_validator(mode="after")
    def _check(self) -> SyntheticParams:
        if self.min_side > self.max_side:
            raise ValueError(f"min_side ({self.min_side}) must be <= max_side ({self.max_side})")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must be unique, got {self.classes}")
        return self


@dataclass(frozen=True, config=_STRICT)
class DataParams:
    source: Literal["synthetic", "voc", "coco"]
    root: Str
    year: Annotated[Int, Field(ge=2007, le=2012)]
    train_split: Name
    val_split: Name
    download: Bool
    on_error: Literal["raise", "skip"]
    synthetic: SyntheticParams

    @model_validator(mode="after")
    def _check(self) -> DataParams:
        if self.train_split == self.val_split:
            raise ValueError(f"train_split and val_split are both {self.train_split!r}")
        if self.download and (self.source != "voc" or self.year != 2012):
            raise ValueError("download fetches VOC2012 only: set source: voc and year: 2012")
        if self.download and Path(self.root).name != "VOCdevkit":
            raise ValueError(
                f"with download: true, root must be a folder named VOCdevkit (got {self.root!r}): "
                "the archive unpacks VOCdevkit/VOC2012 into root's parent"
            )
        return self


@dataclass(frozen=True, config=_STRICT)
class ImageParams:
    mode: Literal["none", "shrink", "crop"]
    size: Annotated[Int, Field(ge=32, le=2048)]


@dataclass(frozen=True, config=_STRICT)
class ReportParams:
    samples: Annotated[Int, Field(ge=0, le=64)]
    mode_samples: Annotated[Int, Field(ge=0, le=16)]


@dataclass(frozen=True, config=_STRICT)
class BackboneParams:
    name: Name
    layer: Str
    weights: Literal["imagenet", "random"]
    device: Literal["auto", "cpu", "cuda"]
    store_dtype: Literal["float16", "float32"]
    precision: Literal["auto", "float32", "bfloat16"]  # the backbone's compute precision
    batch_size: Annotated[Int, Field(ge=1, le=4096)]
    workers: Literal["auto"] | Annotated[Int, Field(ge=0, le=64)]
    compile: Bool
    fine_layer: Str
    hflip: Bool  # also the training images flipped left to right: train_flipped.safetensors
    processes: Annotated[Int, Field(ge=1, le=1024)]  # > 1: extract runs under torchrun

    @model_validator(mode="after")
    def _check(self) -> BackboneParams:
        if self.name not in BACKBONE_LAYERS:
            known = ", ".join(BACKBONE_LAYERS)
            close = _did_you_mean(self.name, list(BACKBONE_LAYERS))
            raise ValueError(f"name: {self.name!r} is unknown{close}; allowed: {known}")
        if self.layer != AUTO_LAYER and self.layer not in BACKBONE_LAYERS[self.name]:
            allowed = ", ".join((AUTO_LAYER, *BACKBONE_LAYERS[self.name]))
            raise ValueError(f"layer: {self.name} has no layer {self.layer!r}; allowed: {allowed}")
        if self.fine_layer != "none":
            fine = FINE_LAYERS.get(self.name)
            if fine is None or self.layer not in (AUTO_LAYER, BACKBONE_LAYERS[self.name][0]):
                with_fine = ", ".join(f"{n} ({f})" for n, f in FINE_LAYERS.items())
                raise ValueError(
                    f"fine_layer: a second level is available for {with_fine}, with "
                    "their default layer only; set fine_layer: none"
                )
            if self.fine_layer != fine:
                raise ValueError(
                    f"fine_layer: {self.name}'s stride-16 level is {fine!r} (or "
                    f"none), not {self.fine_layer!r}"
                )
        return self


@dataclass(frozen=True, config=_STRICT)
class HeadParams:
    dropout: Probability
    hidden: PositiveInt
    classifier: Literal["flatten", "pooled"]
    classifier_dropout: Probability
    grid_hidden: PositiveInt
    single_kind: Literal["lab", "spatial"]  # heads.MlpSingleHead / heads.SpatialSingleHead
    grid_kind: Literal["lab", "conv", "fcos", "retinanet"]  # headkinds.py: the classes
    conv_width: Annotated[Int, Field(ge=1, le=4096)]  # the conv and spatial heads' trunk
    conv_depth: Annotated[Int, Field(ge=0, le=8)]
    tower_width: Annotated[Int, Field(ge=1, le=4096)]  # torchvision's heads (fcos, retinanet)
    tower_depth: Annotated[Int, Field(ge=0, le=8)]


@dataclass(frozen=True, config=_STRICT)
class TrainParams:
    seed: Annotated[Int, Field(ge=0)]
    epochs: PositiveInt
    batch_size: Annotated[Int, Field(ge=2, le=65536)]  # BatchNorm needs 2 samples per batch
    lr: PositiveFloat
    weight_decay: Annotated[Float, Field(ge=0.0)]
    lr_schedule: Literal["constant", "cosine"]
    ema_decay: Annotated[Float, Field(ge=0.0, lt=1.0)]  # 0: off; see loop.fit
    warmup_epochs: Annotated[Float, Field(ge=0.0, le=1000.0)]  # see loop.WarmUp
    monitor: Literal["box_loss_plus_error", "loss", "last"]
    box_weight: Annotated[Float, Field(ge=0.0)]
    class_weight: Annotated[Float, Field(ge=0.0)]
    obj_weight: Annotated[Float, Field(ge=0.0)]
    box_loss: Literal["smooth_l1", "ciou"]  # see losses.box_loss
    obj_loss: Literal["bce", "focal"]
    obj_target: Literal["binary", "iou"]
    focal_gamma: Annotated[Float, Field(ge=0.0)]
    focal_alpha: Annotated[Float, Field(ge=0.0, le=1.0)]
    device: Literal["auto", "cpu", "cuda"]
    cpu_kernels: Literal["avx2", "native"]  # see loop.CPU_KERNELS
    features: Literal["memory", "disk"]  # see featurefiles.FeatureRows
    hflip: Share  # a training image is taken flipped left to right (loop.Flips)
    hflip_from: Literal["extracted", "mirrored"]  # the flipped images' features or mirrored maps


@dataclass(frozen=True, config=_STRICT)
class GridParams:
    num_cells: Annotated[Int, Field(ge=1, le=64)]
    anchors: Annotated[Int, Field(ge=0, le=16)]
    anchor_ratio: Annotated[Float, Field(gt=1.0, le=100.0)]  # conv heads: YOLOv5's anchor_t
    fine_below: Annotated[Float, Field(gt=0.0, le=1.0)]
    assign: Literal["centre", "neighbours"]  # see targets.GridLevel


@dataclass(frozen=True, config=_STRICT)
class EvalParams:
    score_threshold: Probability
    nms_iou: Annotated[Float, Field(gt=0.0, le=1.0)]
    iou_threshold: Annotated[Float, Field(gt=0.0, le=1.0)]
    max_detections: Annotated[Int, Field(ge=1, le=10000)]
    draw_score: Probability
    samples: Annotated[Int, Field(ge=0, le=64)]
    bootstrap: Annotated[Int, Field(ge=100, le=100_000)]  # draws of the val images (intervals)
    confidence: Annotated[Float, Field(ge=0.5, lt=1.0)]  # of the intervals


@dataclass(frozen=True, config=_STRICT)
class FinetuneParams:
    enabled: Bool
    seed: Annotated[Int, Field(ge=0)]
    epochs: PositiveInt
    batch_size: Annotated[Int, Field(ge=2, le=4096)]  # the head's BatchNorm needs 2 per batch
    lr: PositiveFloat
    weight_decay: Annotated[Float, Field(ge=0.0)]
    lr_schedule: Literal["constant", "cosine"]
    monitor: Literal["loss", "last"]  # the epoch kept: lowest val loss, or the last one
    unfreeze: Literal["all"] | Annotated[Int, Field(ge=0, le=1000)]
    hflip: Share
    scale_jitter: Probability
    translate: Annotated[Float, Field(ge=0.0, le=0.5)]
    color_jitter: Annotated[Float, Field(ge=0.0, le=1.0)]
    workers: Literal["auto"] | Annotated[Int, Field(ge=0, le=64)]
    device: Literal["auto", "cpu", "cuda"]
    processes: Annotated[Int, Field(ge=1, le=1024)]  # > 1: finetune runs under torchrun (DDP)


@dataclass(frozen=True, config=_STRICT)
class Params:
    data: DataParams
    image: ImageParams
    report: ReportParams
    backbone: BackboneParams
    head: HeadParams
    train: TrainParams
    grid: GridParams
    eval: EvalParams
    finetune: FinetuneParams

    @model_validator(mode="after")
    def _check(self) -> Params:
        problems = combined_problems(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self


# The grid kinds that assign boxes to their own locations (torchvision's detectors: no grid.*
# anchors, GroupNorm towers in 32 groups): what each does instead of grid anchors.
OWN_ASSIGNMENT = {
    "fcos": ("predicts one box per location, without anchor boxes", "FCOSHead"),
    "retinanet": ("places its own 9 anchor boxes per location", "RetinaNetHead"),
}
# torchvision's RetinaNetHead builds towers of 4 convolutions, which retinanet.py cuts to
# head.tower_depth (FCOSHead builds as many as it is asked for)
MOST_TOWER_CONVOLUTIONS = {"retinanet": 4}


def combined_problems(p: Params) -> list[str]:
    """What breaks the rules that combine keys of several groups, a line each, each starting with
    the key at fault and naming the others: checked when params.yaml is read, before any stage
    reads data."""
    two_levels, kind = p.backbone.fine_layer != "none", p.head.grid_kind
    own = OWN_ASSIGNMENT.get(kind)
    problems = []
    if two_levels and p.image.size % 32:
        problems.append(
            f"image.size: {p.image.size}: backbone.fine_layer {p.backbone.fine_layer} needs a "
            "multiple of 32 (the two levels' strides, 32 and 16, must divide it)"
        )
    if own and p.grid.anchors:
        problems.append(
            f"grid.anchors: {p.grid.anchors}: head.grid_kind {kind} {own[0]}; set grid.anchors: 0"
        )
    if two_levels and p.grid.anchors and not own:
        problems.append(
            f"grid.anchors: {p.grid.anchors} with a second feature level (backbone.fine_layer "
            f"{p.backbone.fine_layer}) is not supported: set grid.anchors: 0 or "
            "backbone.fine_layer: none"
        )
    if own and p.head.tower_width % 32:
        problems.append(
            f"head.tower_width: {p.head.tower_width}: head.grid_kind {kind} normalises its towers "
            f"in 32 groups (torchvision's {own[1]}); use a multiple of 32"
        )
    deepest = MOST_TOWER_CONVOLUTIONS.get(kind)
    if deepest is not None and p.head.tower_depth > deepest:
        problems.append(
            f"head.tower_depth: {p.head.tower_depth}: head.grid_kind {kind} has at most "
            f"{deepest} convolutions per tower (torchvision's {own[1]}); use 0 to {deepest}"
        )
    if p.grid.assign == "neighbours" and p.head.grid_kind == "lab":
        problems.append(
            "grid.assign: neighbours needs head.grid_kind conv (the lab's head cannot reach a "
            "centre outside its cell); set grid.assign: centre or head.grid_kind: conv"
        )
    return problems


def by_name(cls: type[T], group: Any, **given: Any) -> T:
    """An instance of the dataclass `cls` (a library's settings: loop.TrainConfig,
    losses.LossWeights, detection.Filtering) whose fields take the values of the params group's
    keys of the same names; `given` sets the others (or overrides), the rest keep cls's defaults.
    By name, so that a key added to a group and to a settings class reaches every user of both."""
    keys = {f.name for f in dataclasses.fields(group)}
    values = {f.name: getattr(group, f.name) for f in dataclasses.fields(cls) if f.name in keys}
    return cls(**(values | given))


def parse_params(raw: Any, source: str = "params.yaml") -> Params:
    """Validate a params mapping (as read from YAML) into `Params`, or raise `ParamsError`."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of groups, got {type(raw).__name__}")
    try:
        return TypeAdapter(Params).validate_python(raw)
    except ValidationError as exc:
        lines = [line for error in exc.errors() for line in _describe(error).splitlines()]
        raise ParamsError("\n".join(f"{source}: {line}" for line in lines)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ParamsError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    return parse_params(raw, str(path))


def _did_you_mean(word: str, choices: list[str]) -> str:
    """', did you mean 'x'?' for the closest of `choices` to a mistyped `word`, or ''."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f", did you mean {close[0]!r}?" if close else ""


def _describe(error: dict) -> str:
    """One line per pydantic error: dotted key, what is wrong, what is allowed.

    pydantic's dataclasses report an unknown key as "unexpected_keyword_argument" and a missing
    one as "missing"; every error has a location and the input at fault.
    """
    loc = [str(part) for part in error["loc"]]
    key = ".".join(loc)
    kind = error["type"]
    if kind == "unexpected_keyword_argument":
        names = _field_names(loc[:-1])
        return (
            f"{key}: unknown key{_did_you_mean(loc[-1], names)} (allowed here: {', '.join(names)})"
        )
    if kind == "missing":
        return f"{key}: missing"
    message = error["msg"].removeprefix("Value error, ")
    if kind == "string_pattern_mismatch":
        message = "must be a plain name of letters, digits, '_' or '-' (no paths or spaces)"
    if kind == "value_error" and not loc:  # rules across groups: their lines name their keys
        return message
    if kind == "value_error":  # a rule across fields: "field: ..." names the field at fault
        field, _, rest = message.partition(": ")
        if field in _field_names(loc):
            return f"{key}.{field}: {rest}"
        return f"{key}: {message}"
    if isinstance(error["input"], dict):  # a whole group given: printing it says nothing more
        return f"{key}: {message}"
    return f"{key}: {message} (got {error['input']!r})"


def _field_names(loc: list[str]) -> list[str]:
    """Field names of the dataclass found by walking `loc` down from `Params`."""
    cls: Any = Params
    for part in loc:
        hints = typing.get_type_hints(cls)
        if part not in hints or not dataclasses.is_dataclass(hints[part]):
            return []
        cls = hints[part]
    return [field.name for field in dataclasses.fields(cls)]
