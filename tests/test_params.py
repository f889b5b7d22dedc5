"""params.yaml validation: every problem names its key and what is allowed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from pipeline_lib.base.params import (
    EvalParams,
    FinetuneParams,
    ParamsError,
    TrainParams,
    _field_names,
    by_name,
    load_params,
    parse_params,
)
from pipeline_lib.boxes.detection import Filtering
from pipeline_lib.models.losses import LossWeights
from pipeline_lib.training.loop import TrainConfig

REPOSITORY_PARAMS = (Path(__file__).resolve().parents[1] / "params.yaml").read_text()


def error_for(raw) -> str:
    with pytest.raises(ParamsError) as info:
        parse_params(raw)
    return str(info.value)


def test_repository_params_are_valid(raw_params):
    params = parse_params(raw_params)
    assert params.data.source == "synthetic"
    assert params.head.dropout == raw_params["head"]["dropout"]
    assert params.image.mode in ("none", "shrink", "crop")


@pytest.mark.parametrize(
    ("group", "key", "value", "expected"),
    [
        ("head", "dropout", 1.5, "head.dropout: Input should be less than 1 (got 1.5)"),
        ("head", "dropout", -0.1, "head.dropout: Input should be greater than or equal to 0"),
        ("image", "mode", "zoom", "image.mode: Input should be 'none', 'shrink' or 'crop'"),
        ("data", "source", "kitti", "data.source: Input should be 'synthetic', 'voc' or 'coco'"),
        ("data", "on_error", "ignore", "data.on_error: Input should be 'raise' or 'skip'"),
        ("data", "year", 2013, "data.year: Input should be less than or equal to 2012"),
        ("data", "download", "yes", "data.download: Input should be a valid boolean (got 'yes')"),
        ("train", "epochs", 2.5, "train.epochs: Input should be a valid integer (got 2.5)"),
        ("train", "lr", 0, "train.lr: Input should be greater than 0"),
        ("data", "train_split", "../x", "data.train_split: must be a plain name"),
        ("image", "size", "224", "image.size: Input should be a valid integer (got '224')"),
        # BatchNorm cannot train on one sample: every batch would be skipped
        ("train", "batch_size", 1, "train.batch_size: Input should be greater than or equal to 2"),
        ("train", "cpu_kernels", "avx512", "train.cpu_kernels: Input should be 'avx2' or 'native'"),
        (
            "head",
            "grid_kind",
            "yolo",
            "head.grid_kind: Input should be 'lab', 'conv', 'fcos' or 'retinanet'",
        ),
        ("head", "conv_depth", 9, "head.conv_depth: Input should be less than or equal to 8"),
    ],
)
def test_bad_values_name_key_and_allowed(raw_params, group, key, value, expected):
    raw_params[group][key] = value
    assert expected in error_for(raw_params)


def test_unknown_and_missing_keys(raw_params):
    raw_params["head"]["dropuot"] = 0.3
    assert (
        "head.dropuot: unknown key, did you mean 'dropout'? (allowed here: dropout, hidden, "
        "classifier, "
        "classifier_dropout, grid_hidden, single_kind, grid_kind, conv_width, conv_depth, "
        "tower_width, tower_depth)" in error_for(raw_params)
    )
    del raw_params["head"]["dropuot"]
    raw_params["extra_group"] = {}
    assert "extra_group: unknown key (allowed here: data, image," in error_for(raw_params)
    raw_params["trian"] = raw_params.pop("train")  # a mistyped group gets its suggestion too
    assert "trian: unknown key, did you mean 'train'?" in error_for(raw_params)
    raw_params["train"] = raw_params.pop("trian")
    del raw_params["extra_group"]
    del raw_params["data"]["synthetic"]["seed"]
    assert "data.synthetic.seed: missing" in error_for(raw_params)


def test_all_errors_reported_at_once(raw_params):
    raw_params["head"]["dropout"] = 2.0
    raw_params["image"]["mode"] = "zoom"
    message = error_for(raw_params)
    assert "head.dropout" in message and "image.mode" in message


def test_cross_field_rules(raw_params):
    raw_params["data"]["synthetic"]["min_side"] = 500
    assert "data.synthetic: min_side (500) must be <= max_side" in error_for(raw_params)
    raw_params["data"]["synthetic"]["min_side"] = 160
    raw_params["data"]["synthetic"]["classes"] = ["circle", "blob"]
    assert "data.synthetic.classes.1: Input should be 'circle'" in error_for(raw_params)
    raw_params["data"]["synthetic"]["classes"] = ["circle", "circle"]
    assert "classes must be unique" in error_for(raw_params)
    raw_params["data"]["synthetic"]["classes"] = ["circle"]
    raw_params["data"]["download"] = True
    assert "download fetches VOC2012 only" in error_for(raw_params)
    raw_params["data"].update(source="voc", year=2012, root="data/voc")
    assert "root must be a folder named VOCdevkit" in error_for(raw_params)
    raw_params["data"].update(root="data/VOCdevkit", val_split="train")
    assert "train_split and val_split are both 'train'" in error_for(raw_params)


# Rules that combine groups: (changes to the repository's params, the whole error line); each
# combination is one that fails (or trains nonsense) only after data has been read otherwise.
COMBINED = [
    (
        {"backbone": {"fine_layer": "blocks.4"}, "image": {"size": 200}},
        "params.yaml: image.size: 200: backbone.fine_layer blocks.4 needs a multiple of 32 (the "
        "two levels' strides, 32 and 16, must divide it)",
    ),
    (
        {"grid": {"anchors": 3}, "head": {"grid_kind": "fcos", "tower_width": 64}},
        "params.yaml: grid.anchors: 3: head.grid_kind fcos predicts one box per location, without "
        "anchor boxes; set grid.anchors: 0",
    ),
    (
        {
            "backbone": {"fine_layer": "blocks.4"},
            "grid": {"anchors": 2},
            "head": {"grid_kind": "conv"},
        },
        "params.yaml: grid.anchors: 2 with a second feature level (backbone.fine_layer blocks.4) "
        "is not supported: set grid.anchors: 0 or backbone.fine_layer: none",
    ),
    (
        {"head": {"grid_kind": "fcos", "tower_width": 48}},
        "params.yaml: head.tower_width: 48: head.grid_kind fcos normalises its towers in 32 groups "
        "(torchvision's FCOSHead); use a multiple of 32",
    ),
    (
        {"grid": {"anchors": 3}, "head": {"grid_kind": "retinanet", "tower_width": 64}},
        "params.yaml: grid.anchors: 3: head.grid_kind retinanet places its own 9 anchor boxes per "
        "location; set grid.anchors: 0",
    ),
    (
        {"head": {"grid_kind": "retinanet", "tower_width": 100}},
        "params.yaml: head.tower_width: 100: head.grid_kind retinanet normalises its towers in 32 "
        "groups (torchvision's RetinaNetHead); use a multiple of 32",
    ),
    (
        {"head": {"grid_kind": "retinanet", "tower_depth": 5}},
        "params.yaml: head.tower_depth: 5: head.grid_kind retinanet has at most 4 convolutions "
        "per tower (torchvision's RetinaNetHead); use 0 to 4",
    ),
    (
        {"head": {"grid_kind": "lab"}, "grid": {"assign": "neighbours"}},
        "params.yaml: grid.assign: neighbours needs head.grid_kind conv (the lab's head cannot "
        "reach a centre outside its cell); set grid.assign: centre or head.grid_kind: conv",
    ),
]


@pytest.mark.parametrize(("changes", "line"), COMBINED, ids=lambda v: str(v)[:40])
def test_each_rule_combining_groups_fails_at_load_naming_the_keys(raw_params, changes, line):
    for group, values in changes.items():
        raw_params[group].update(values)
    assert error_for(raw_params) == line
    # one key of the combination set back and the params are valid: the rule needs both
    first_group, first_values = next(iter(changes.items()))
    for key in first_values:
        raw_params[first_group][key] = yaml.safe_load(REPOSITORY_PARAMS)[first_group][key]
    parse_params(raw_params)


def test_every_broken_combination_is_listed_at_once(raw_params):
    raw_params["head"].update(grid_kind="fcos", tower_width=48)
    raw_params["grid"]["anchors"] = 3
    lines = error_for(raw_params).splitlines()
    assert [line.split(":")[1] for line in lines] == [" grid.anchors", " head.tower_width"]
    assert all(line.startswith("params.yaml: ") for line in lines)


def test_file_errors(tmp_path):
    with pytest.raises(ParamsError, match="cannot read"):
        load_params(tmp_path / "missing.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ParamsError, match="expected a mapping"):
        load_params(bad)


def test_a_group_of_the_wrong_kind_and_a_mapping_where_a_value_belongs(raw_params):
    raw_params["head"]["dropout"] = {"p": 0.3}
    raw_params["grid"] = [7, 0]
    lines = error_for(raw_params).splitlines()
    # the input is a mapping: not printed back; a list where a group belongs is shown
    assert "params.yaml: head.dropout: Input should be a valid number" in lines
    assert any(
        line.startswith("params.yaml: grid: Input should be a dictionary")
        and line.endswith("(got [7, 0])")
        for line in lines
    )


def test_field_names_of_a_path():
    assert _field_names(["grid"]) == [
        "num_cells",
        "anchors",
        "anchor_ratio",
        "fine_below",
        "assign",
    ]
    assert _field_names(["data", "synthetic", "classes"]) == []  # a list, not a group
    assert _field_names(["data", "nothing"]) == []


def test_the_file_read_by_default_and_named_in_errors(tmp_path, monkeypatch, raw_params):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw_params))
    assert load_params().head.dropout == raw_params["head"]["dropout"]  # ./params.yaml
    raw_params["head"]["dropout"] = 7.0
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(raw_params))
    with pytest.raises(ParamsError, match=r"^other.yaml: head.dropout: Input should be less"):
        load_params("other.yaml")
    with pytest.raises(ParamsError, match="expected a mapping of groups, got list"):
        parse_params([1, 2])


def test_backbone_layer_auto_fits_every_backbone_and_a_wrong_name_lists_it(raw_params):
    for name in ("efficientnet_lite0", "resnet50", "convnext_tiny"):  # no second key to change
        raw_params["backbone"].update(name=name, layer="auto")
        assert parse_params(raw_params).backbone.layer == "auto"
    raw_params["backbone"].update(name="resnet50", layer="head")
    assert "allowed: auto, layer4, layer3" in error_for(raw_params)
    raw_params["backbone"].update(name="efficientnet_lite0", layer="auto", fine_layer="blocks.4")
    assert parse_params(raw_params).backbone.fine_layer == "blocks.4"  # auto is the default layer
    raw_params["backbone"].update(name="resnet5O", fine_layer="none")
    assert "backbone.name: 'resnet5O' is unknown, did you mean 'resnet50'?" in error_for(raw_params)


def test_settings_take_the_keys_of_their_names(raw_params):
    raw_params["eval"].update(score_threshold=0.3, nms_iou=0.4, max_detections=7, draw_score=0.6)
    ev = parse_params(raw_params).eval
    assert by_name(Filtering, ev) == Filtering(0.3, 0.4, 7)  # draw_score: no field of that name
    assert by_name(Filtering, ev, nms_iou=None) == Filtering(0.3, None, 7)  # given wins
    with pytest.raises(TypeError):  # a given name the settings do not have
        by_name(Filtering, ev, scores=0.1)


def names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_every_setting_of_the_loops_is_a_param_key():
    """A field added to a settings class without its key in params.yaml would keep its default
    whatever the user sets: each is a key of its group."""
    assert names(LossWeights) <= names(TrainParams)
    assert names(Filtering) <= names(EvalParams)
    assert names(TrainConfig) <= names(TrainParams)  # train.device too, resolved by the stage
    # fine-tuning runs without a moving average or warm-up (the loop's defaults: off)
    assert names(TrainConfig) - names(FinetuneParams) == {"ema_decay", "warmup_epochs"}
