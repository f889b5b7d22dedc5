"""The report's judged sections as Markdown: the headline table with intervals and verdicts, what
the intervals cover, the error types of both sides, and the images a change moved (by hand)."""

from __future__ import annotations

import pytest
from PIL import Image
from test_metrics import image
from test_records import records_of

from pipeline_lib.base.errors import PipelineError
from pipeline_lib.measures.bootstrap import Change
from pipeline_lib.measures.errortypes import ERROR_TYPES, ErrorSplit
from pipeline_lib.measures.records import Judging
from pipeline_lib.reporting.plots import MAX_WIDTH
from pipeline_lib.reporting.review import (
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


def splits(*gains: dict[str, float]) -> list[ErrorSplit]:
    """An ErrorSplit per run, each type's gain as given (0 by default), 10 errors of each."""
    return [
        ErrorSplit(0.5, dict.fromkeys(ERROR_TYPES, 0.0) | g, dict.fromkeys(ERROR_TYPES, 10))
        for g in gains
    ]


def test_errors_table_of_one_run_a_side_names_nothing():
    base = splits({"localisation": 0.1, "missed": 0.05})
    new = splits({"localisation": 0.06, "missed": 0.054})
    text = errors_table(base, new, ("main", "workspace"))
    assert "| localisation | 0.1000 | 0.0600 | -0.0400 | 10 → 10 |" in text
    assert "fewer" not in text and "more " not in text
    assert text.endswith(
        "so no type is named here; `make compare` names those that moved beyond "
        "the spread of several seeds."
    )


def test_errors_table_of_several_runs_names_changes_beyond_their_spread():
    """Localisation 0.30-0.34 against 0.20-0.22: apart, the change 0.11 beyond both ranges'
    widths: named. Background 0.010-0.012 against 0.020-0.030: apart, the change 0.014 beyond
    the wider range (0.010): named. Missed 0.03-0.05 against 0.045-0.06: the ranges meet.
    Duplicate 0.01-0.02 against 0.025-0.05: apart, but the change 0.0225 is below the wider
    range 0.025: not named."""
    base = splits(
        {"localisation": 0.30, "missed": 0.03, "background": 0.010, "duplicate": 0.01},
        {"localisation": 0.34, "missed": 0.05, "background": 0.012, "duplicate": 0.02},
    )
    new = splits(
        {"localisation": 0.22, "missed": 0.06, "background": 0.020, "duplicate": 0.025},
        {"localisation": 0.20, "missed": 0.045, "background": 0.030, "duplicate": 0.05},
    )
    text = errors_table(base, new, ("a", "b"))
    assert "| localisation | 0.3200 (0.3000-0.3400) | 0.2100 (0.2000-0.2200) | -0.1100 |" in text
    assert "- fewer localisation errors: they cost 0.3200 (0.3000-0.3400) mAP before" in text
    assert "- more detections on the background: they cost 0.0110 (0.0100-0.0120)" in text
    assert "missed objects" not in text and "duplicate detections" not in text
    assert text.endswith(
        "(Named: the two sides' ranges apart, and the change at least the wider range.)"
    )
    quiet = errors_table(base, base, ("a", "b"))
    assert quiet.endswith(
        "No error type moved beyond the runs' spread (the two sides' ranges "
        "apart, and the change at least the wider range)."
    )


def test_error_splits_of_each_run():
    """One image, one cat: a run finds it (no error), another puts its box beside it (IoU 0.4,
    localisation: gain 1)."""
    good = records_of([image([A], [0.9], [A])])
    poor = records_of([image([[0, 0, 100, 40]], [0.9], [A])])
    found = error_splits([good, poor], ["im0"])
    assert [s.gains["localisation"] for s in found] == pytest.approx([0.0, 1.0])
    assert [s.counts["localisation"] for s in found] == [0, 1]


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
