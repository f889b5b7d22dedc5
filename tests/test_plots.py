"""Figures a reviewer reads: at most a PR column wide at >= 100 dpi, boxes that stand out."""

from __future__ import annotations

import torch
from PIL import Image

from pipeline_lib.reporting import plots

PR_COLUMN_PX = 880  # GitHub's comment column, CSS pixels


def saved(figure, tmp_path) -> Image.Image:
    path = tmp_path / "figure.png"
    plots.save_figure(figure, path)
    image = Image.open(path)
    image.load()
    return image


def test_figures_fit_a_pr_column_at_100_dpi(tmp_path):
    history = [
        {s: dict.fromkeys(("a", "b", "c", "d", "e", "f", "g"), 1.0 / e) for s in ("train", "val")}
        for e in range(1, 4)
    ]
    photo = Image.new("RGB", (500, 375), "white")
    boxes = torch.tensor([[10.0, 20.0, 200.0, 300.0]])
    panel = plots.Panel(photo, boxes, [0], "photo")
    comparison = plots.Comparison(photo, boxes, ["cat"], boxes, ["cat 0.9"], "photo")
    classes = [f"class{k}" for k in range(20)]
    outcomes = plots.Outcomes(boxes, ["cat 0.9"], boxes, ["dog 0.3"], boxes, ["cow"], "main")
    figures = {
        "curves": plots.training_curves(history, 2, "grid head"),
        "samples": plots.image_grid([[panel] * 4] * 2, ["cat"], "samples"),
        "predictions": plots.comparison_grid([comparison] * 8),
        "confusion": plots.confusion_figure(torch.eye(20, dtype=torch.long), classes),
        "nms": plots.nms_grid([(comparison, comparison)]),
        "errors": plots.error_chart(
            dict.fromkeys(("classification", "localisation", "missed"), 0.1),
            dict.fromkeys(("classification", "localisation", "missed"), 7),
            "mAP gained by fixing each error type alone",
        ),
        "outcomes": plots.outcome_pair(
            Image.new("RGB", (1200, 300)), (outcomes, outcomes), "a wide photo"
        ),
    }
    for name, figure in figures.items():
        image = saved(figure, tmp_path)
        assert image.width <= PR_COLUMN_PX, (name, image.size)
        assert round(image.info["dpi"][0]) >= 100, (name, image.info["dpi"])


def test_class_colours_are_distinct_and_not_pale():
    colours = [plots.class_colour(k) for k in range(20)]
    assert len(set(colours)) == 20
    for r, g, b in colours:
        assert 0.2126 * r + 0.7152 * g + 0.0722 * b < 0.85  # relative luminance: no pastel


def test_boxes_on_a_photo_are_thick_with_a_dark_edge():
    photo = Image.new("RGB", (640, 480), (200, 200, 200))  # light grey, like a kitchen wall
    out = plots.annotate(photo, torch.tensor([[100.0, 100.0, 400.0, 300.0]]), ["chair"], [3])
    colour = tuple(round(255 * c) for c in plots.class_colour(3))
    row = [out.getpixel((x, 200)) for x in range(95, 115)]  # across the left edge
    coloured = [x for x, p in zip(range(95, 115), row, strict=True) if p == colour]
    assert len(coloured) >= 3  # at least 3 px at 480 px (1 px per 160 of the short side)
    assert row[coloured[0] - 95 - 1] == (0, 0, 0) and row[coloured[-1] - 95 + 1] == (0, 0, 0)
    assert out.size == photo.size


def test_figures_of_photos_are_written_with_a_palette_and_charts_are_not(tmp_path):
    noise = Image.effect_noise((300, 300), 80).convert("RGB")  # a textured photo
    boxes = torch.tensor([[10.0, 20.0, 200.0, 250.0]])
    grid = plots.image_grid([[plots.Panel(noise, boxes, [0], "noise")] * 3], ["cat"])
    with saved(grid, tmp_path) as image:
        assert image.mode == "P" and len(image.getcolors(256)) <= 256
    chart = plots.ap_chart({"cat": 0.5, "dog": None}, "AP")
    with saved(chart, tmp_path) as image:
        assert image.mode == "RGBA"


def test_error_chart_labels_each_bar_with_its_gain_and_count():
    gains = {"classification": 0.0213, "localisation": 0.186, "missed": 0.0}
    figure = plots.error_chart(gains, {"classification": 3, "localisation": 12, "missed": 0}, "t")
    [ax] = figure.axes
    labels = [t.get_text() for t in ax.texts]
    assert labels == ["0.021 (3 errors)", "0.186 (12 errors)", "0.000 (0 errors)"]
    assert [t.get_text() for t in ax.get_yticklabels()] == list(gains)
    assert [round(b.get_width(), 4) for b in ax.patches] == [0.0213, 0.186, 0.0]


def test_outcomes_are_drawn_in_three_colours():
    """Found boxes green, false ones red, missed objects orange and dashed, on both panels."""
    box = torch.tensor([[10.0, 10.0, 50.0, 50.0]])
    none = torch.zeros(0, 4)
    left = plots.Outcomes(box, ["cat 0.9"], none, [], box + 60, ["dog"], "base")
    right = plots.Outcomes(none, [], box, ["cat 0.4"], none, [], "change")
    figure = plots.outcome_pair(Image.new("RGB", (120, 120)), (left, right), "im0")
    edges = [[(p.get_edgecolor()[:3], p.get_linestyle()) for p in ax.patches] for ax in figure.axes]
    green, red, orange = (plots.to_rgb(c) for c in ("#2ca02c", "#d62728", "#ff7f0e"))
    assert edges[0] == [(orange, "--"), (green, "-")]  # missed drawn first, found on top
    assert edges[1] == [(red, "-")]
    assert [ax.get_title() for ax in figure.axes] == ["base", "change"]
