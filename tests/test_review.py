"""The report's judged sections as Markdown: the headline table with intervals and verdicts, what
the intervals cover, the error types of both sides, and the images a change moved (by hand)."""

from __future__ import annotations

import pytest
from PIL import Image
from test_metrics import image
from test_records import records_of

from pipeline_lib.bootstrap import Change
from pipeline_lib.errors import PipelineError
from pipeline_lib.plots import MAX_WIDTH
from pipeline_lib.records import Judging
from pipeline_lib.review import (
    Judged,
    common_images,
    error_splits,
    errors_table,
    judge,
    judged_table,
    moved_figure,
    moved_images,
    moved_table,
    noise_statement,
)

A, B = [0, 0, 100, 100], [200, 0, 300, 100]
FAR = [600, 600, 650, 650]


def test_judged_table_rows_and_verdicts():
    rows = [
        ("reports/evaluate_multi", Judged("map", Change(0.25, 0.3, 0.01, 0.09, 0.95), 186)),
        ("reports/evaluate_single", Judged("accuracy", Change(0.8, 0.79, -0.03, 0.01, 0.95), 186)),
    ]
    text = judged_table(rows, ("main", "workspace"), (3, 1))
    lines = text.splitlines()
    assert lines[0] == (
        "| file | figure | main (3 runs) | workspace | change | 95 % interval of the change "
        "| verdict |"
    )
    assert lines[2] == (
        "| reports/evaluate_multi | **map** | 0.2500 | 0.3000 | +0.0500 | +0.0100 … +0.0900 "
        "| **better** |"
    )
    assert lines[3].endswith("| -0.0100 | -0.0300 … +0.0100 | within noise |")


def test_what_the_intervals_cover_is_said_plainly():
    one = noise_statement((1, 1), 186)
    assert "186 val images only" in one and "**not** the spread between training seeds" in one
    several = noise_statement((3, 3), 186)
    assert "Runs compared: 3 and 3" in several and "spread between the runs" in several


def test_errors_table_says_which_types_moved():
    base = {"map_gain": dict.fromkeys(["classification", "localisation"], 0.1), "errors": {}}
    base["map_gain"] |= {"both": 0.0, "duplicate": 0.01, "background": 0.02, "missed": 0.05}
    base["errors"] = dict.fromkeys(base["map_gain"], 10)
    new = {"map_gain": dict(base["map_gain"], localisation=0.06, missed=0.054), "errors": {}}
    new["errors"] = dict(base["errors"], localisation=4)
    text = errors_table(base, new, ("main", "workspace"))
    assert "| localisation | 0.1000 | 0.0600 | -0.0400 | 10 → 4 |" in text
    assert "- fewer localisation errors: they cost 0.100 mAP before, 0.060 now" in text
    assert "missed errors" not in text  # 0.004: below the 0.005 line
    unchanged = errors_table(base, base, ("main", "workspace"))
    assert unchanged.endswith("No error type moved by 0.005 mAP or more.")


def test_error_splits_average_the_runs():
    """One image, one cat: a run finds it (no error), another puts its box beside it (IoU 0.4,
    localisation: gain 1). The mean of the two runs: gain 0.5, half an error."""
    good = records_of([image([A], [0.9], [A])])
    poor = records_of([image([[0, 0, 100, 40]], [0.9], [A])])
    split = error_splits([good, poor], ["im0"])
    assert split["map_gain"]["localisation"] == pytest.approx(0.5)
    assert split["errors"]["localisation"] == pytest.approx(0.5)


def test_judging_identical_multi_records_gives_zero_intervals():
    records = records_of([image([A, FAR], [0.9, 0.8], [A]), image([B], [0.7], [A])])
    for judged in judge([records], [records], 300, 0.95):
        assert (judged.change.low, judged.change.high) == (0.0, 0.0)
        assert judged.change.verdict == "within noise"


def test_only_the_images_both_sides_have_are_compared():
    one = records_of([image([A], [0.9], [A]), image([A], [0.9], [A])])
    other = records_of([image([A], [0.9], [A])])
    assert common_images([one, other]) == ["im0"]
    shifted = one.restricted(["im1"])
    with pytest.raises(PipelineError, match="share no val image"):
        common_images([shifted, other])


def sides():
    """Three images. im0: both sides find A. im1: the base finds A and adds two false
    positives, the new side finds A only. im2: the base misses B, the new side finds it and
    adds a false positive below the draw score (0.1: not counted)."""
    base = records_of(
        [
            image([A], [0.9], [A]),
            image([A, FAR, [700, 700, 750, 750]], [0.9, 0.5, 0.4], [A]),
            image([], [], [B]),
        ],
        Judging(0.5, "continuous", 0.2),
    )
    new = records_of(
        [image([A], [0.8], [A]), image([A], [0.9], [A]), image([B, FAR], [0.6, 0.1], [B])],
        Judging(0.5, "continuous", 0.2),
    )
    return base, new


def test_moved_images_by_hand():
    base, new = sides()
    moved = moved_images(base, new, count=4)
    assert [m.image_id for m in moved] == ["im1", "im2"]  # im1: 2 false fewer; im2: 1 found
    assert moved[0].counts == (
        {"found": 1, "false": 2, "missed": 0},
        dict(found=1, false=0, missed=0),
    )
    assert moved[1].counts == (
        {"found": 0, "false": 0, "missed": 1},
        dict(found=1, false=0, missed=0),
    )
    old, now = moved[1].outcomes
    assert old.missed.tolist() == [B] and old.missed_texts == ["cat"] and len(old.found) == 0
    assert now.found.tolist() == [B] and now.found_texts == ["cat 0.60"] and len(now.false) == 0
    assert moved_images(base, new, count=1)[0].image_id == "im1"
    assert moved_images(base, base, count=4) == []


def test_moved_table_and_figure():
    base, new = sides()
    moved = moved_images(base, new, count=4)
    text = moved_table(moved, ("main", "workspace"), {"im1": "moved/im1.png"}.get)
    assert "| im1 | 1 → 1 | 2 → 0 | 0 → 0 |" in text
    assert "| im2 | 0 → 1 | 0 → 0 | 1 → 0 |" in text
    assert "![im1](moved/im1.png)" in text and "moved/im2" not in text  # no photo, no picture
    figure = moved_figure(moved[0], ("main", "workspace"), Image.new("RGB", (800, 800)))
    assert figure.get_size_inches()[0] <= MAX_WIDTH
    titles = [ax.get_title() for ax in figure.axes]
    assert titles == ["main: 1 found, 2 false, 0 missed", "workspace: 1 found, 0 false, 0 missed"]
