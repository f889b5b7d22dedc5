"""Figures people look at: exploration charts and images with their boxes drawn.

Functions return matplotlib `Figure`s built without pyplot (no global state, no display needed);
`save_figure` writes them as PNG, atomically.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from pipeline_lib.files import atomic_file
from pipeline_lib.geometry import IMAGE_MODES, transform_boxes, transform_image


@dataclass
class Panel:
    """One image to show: its boxes as (N, 4) xyxy pixels, their class ids, and a title."""

    image: Image.Image
    boxes: torch.Tensor
    class_ids: list[int]
    title: str = ""


def class_colour(class_id: int) -> tuple[float, float, float]:
    """A stable, readable colour per class (matplotlib's tab20 palette)."""
    from matplotlib import colormaps

    return colormaps["tab20"](class_id % 20)[:3]


def save_figure(figure: Figure, path: str | Path, dpi: int = 80) -> None:
    """Write `figure` as PNG (image grids use a lower `dpi` to stay well under 1 MB)."""
    with atomic_file(path) as tmp:
        figure.savefig(tmp, format="png", dpi=dpi)


def size_histograms(images: pd.DataFrame, title: str) -> Figure:
    """Histograms of image width and height (pixels)."""
    figure = Figure(figsize=(9, 3.2), layout="constrained")
    for ax, column in zip(figure.subplots(1, 2), ("width", "height"), strict=True):
        values = images[column].to_numpy()
        ax.hist(values, bins=min(30, max(1, len(np.unique(values)))), color="#4c72b0")
        ax.set_xlabel(f"{column} (pixels)")
        ax.set_ylabel("images")
    figure.suptitle(f"{title}: image sizes ({len(images)} images)")
    return figure


def class_count_chart(summary: dict, classes: list[str]) -> Figure:
    """Horizontal bars: objects per class, one bar per split."""
    splits = list(summary)
    figure = Figure(
        figsize=(8, 0.2 * len(classes) * max(1, len(splits)) + 1.5), layout="constrained"
    )
    ax = figure.subplots()
    height = 0.8 / max(1, len(splits))
    positions = np.arange(len(classes))
    for k, split in enumerate(splits):
        counts = [summary[split]["objects_per_class"][name] for name in classes]
        bars = ax.barh(positions + k * height, counts, height=height, label=split)
        ax.bar_label(bars, fontsize=7, padding=2)
    ax.set_yticks(positions + height * (len(splits) - 1) / 2, classes)
    ax.invert_yaxis()
    ax.set_xlabel("objects")
    figure.legend(loc="outside lower center", ncols=len(splits))
    ax.set_title("Objects per class")
    return figure


def image_grid(rows: list[list[Panel]], class_names: list[str], title: str = "") -> Figure:
    """A grid of images with their boxes and class names drawn."""
    n_rows, n_cols = len(rows), max((len(r) for r in rows), default=1)
    figure = Figure(figsize=(3.2 * n_cols, 3.0 * n_rows), layout="constrained")
    axes = np.atleast_2d(figure.subplots(n_rows, n_cols, squeeze=False))
    for ax in axes.flat:
        ax.axis("off")
    for r, row in enumerate(rows):
        for c, panel in enumerate(row):
            draw_panel(axes[r, c], panel, class_names)
    if title:
        figure.suptitle(title)
    return figure


def draw_panel(ax: Axes, panel: Panel, class_names: list[str]) -> None:
    ax.imshow(panel.image)
    for box, class_id in zip(panel.boxes.tolist(), panel.class_ids, strict=True):
        colour = class_colour(class_id)
        x0, y0, x1, y1 = box
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=1.5, ec=colour))
        ax.text(
            x0, y0, class_names[class_id], fontsize=6, color="white", va="bottom",
            bbox={"facecolor": colour, "edgecolor": "none", "pad": 1},
        )  # fmt: skip
    ax.set_title(panel.title, fontsize=8)
    ax.axis("off")


def exploration_panels(
    dataset_dir: Path, images: pd.DataFrame, objects: pd.DataFrame
) -> list[Panel]:
    """Panels for the given image rows, loaded from `dataset_dir` with their boxes."""
    panels = []
    by_image = objects.groupby("image_id")
    for row in images.itertuples():
        mine = by_image.get_group(row.image_id) if row.n_objects else objects.iloc[:0]
        with Image.open(dataset_dir / row.path) as image:
            rgb = image.convert("RGB")
        boxes = torch.tensor(mine[["xmin", "ymin", "xmax", "ymax"]].to_numpy(), dtype=torch.float64)
        title = f"{row.image_id} ({row.width}x{row.height})"
        panels.append(Panel(rgb, boxes.reshape(-1, 4), mine["class_id"].tolist(), title))
    return panels


def mode_rows(panels: list[Panel], size: int) -> list[list[Panel]]:
    """Each panel under every image mode (none / shrink / crop), one row per panel."""
    rows = []
    for panel in panels:
        row = []
        for mode in IMAGE_MODES:
            width, height = panel.image.size
            boxes, keep = transform_boxes(panel.boxes, width, height, mode, size)
            ids = [i for i, k in zip(panel.class_ids, keep.tolist(), strict=True) if k]
            image = transform_image(panel.image, mode, size)
            label = mode if mode == "none" else f"{mode} {size}x{size}"
            row.append(Panel(image, boxes, ids, f"{panel.title}: {label}"))
        rows.append(row)
    return rows


def pick_evenly(frame: pd.DataFrame, count: int) -> pd.DataFrame:
    """`count` rows spread evenly over `frame` sorted by image_id (deterministic samples)."""
    frame = frame.sort_values("image_id")
    if count <= 0 or frame.empty:
        return frame.iloc[:0]
    index = np.unique(np.linspace(0, len(frame) - 1, min(count, len(frame))).round().astype(int))
    return frame.iloc[index]
