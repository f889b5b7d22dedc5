"""Figures people look at: exploration charts and images with their boxes drawn.

Functions return matplotlib `Figure`s built without pyplot (no global state, no display needed);
`save_figure` writes them as PNG, atomically, at DPI. Every figure is at most MAX_WIDTH inches
wide, so that it shows at full size in a pull-request comment; boxes on photos are drawn with a
dark edge around their class colour, so that they stand out on light and dark scenes alike.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib import patheffects
from matplotlib.axes import Axes
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.patches import Rectangle
from PIL import Image

from pipeline_lib.base.files import atomic_file
from pipeline_lib.boxes.geometry import IMAGE_MODES, transform_boxes, transform_image


@dataclass
class Panel:
    """One image to show: its boxes as (N, 4) xyxy pixels, their class ids, and a title."""

    image: Image.Image
    boxes: torch.Tensor
    class_ids: list[int]
    title: str = ""


DPI = 100
MAX_WIDTH = 8.8  # inches: at DPI, the ~880 px of a GitHub pull-request comment column

# Kelly's 19 colours of maximum contrast (not white, black, grey), the strongest first, and
# matplotlib's blue as the 20th (VOC has 20 classes).
# Hand-listed because matplotlib's categorical maps (tab20) pair each colour with a pale twin that
# vanishes on photos (light grey boxes on a kitchen scene).
_KELLY = (
    "be0032 0067a5 008856 f38400 875692 882d17 e68fac 604e97 8db600 b3446c "
    "2b3d26 e25822 654522 f6a600 1f77b4 f3c300 a1caf1 c2b280 dcd300 f99379"
)
PALETTE = _KELLY.split()  # hex RGB
HALO = [patheffects.withStroke(linewidth=3.5, foreground="black")]  # a dark edge around boxes


def class_colour(class_id: int) -> tuple[float, float, float]:
    """A stable, saturated colour per class (PALETTE, repeating after 20 classes)."""
    value = PALETTE[class_id % len(PALETTE)]
    return tuple(int(value[i : i + 2], 16) / 255 for i in (0, 2, 4))


def save_figure(figure: Figure, path: str | Path, dpi: int = DPI) -> None:
    """Write `figure` as PNG. A figure that shows images (photos, heat maps) is reduced to 256
    colours by PIL's octree quantiser: grids of textured photos otherwise weigh megabytes (the
    NMS figure: 2.4 MB -> 0.3 MB), while its lines and labels stay sharp."""
    with atomic_file(path) as tmp:
        if not figure.findobj(AxesImage):
            figure.savefig(tmp, format="png", dpi=dpi)
            return
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=dpi)
        with Image.open(buffer) as image:
            palette = image.convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE)
        palette.save(tmp, format="PNG", optimize=True, dpi=(dpi, dpi))


def grid_figure(n_rows: int, n_cols: int, cell: tuple[float, float] = (3.2, 3.0)) -> Figure:
    """An empty figure for n_rows x n_cols panels of `cell` inches, shrunk to MAX_WIDTH."""
    scale = min(1.0, MAX_WIDTH / (cell[0] * n_cols))
    return Figure(
        figsize=(cell[0] * n_cols * scale, cell[1] * n_rows * scale), layout="constrained"
    )


def size_histograms(images: pd.DataFrame, title: str) -> Figure:
    """Histograms of image width and height (pixels)."""
    figure = Figure(figsize=(MAX_WIDTH, 3.2), layout="constrained")
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
    figure = grid_figure(n_rows, n_cols)
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
        _box(ax, box, colour)
        _tag(ax, box, class_names[class_id], colour)
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


TRUE_COLOUR, PREDICTED_COLOUR = "#2ca02c", "#d62728"


@dataclass
class Comparison:
    """An image with its true boxes (drawn green) and predicted ones (red), xyxy pixels."""

    image: Image.Image
    true_boxes: torch.Tensor
    true_texts: list[str]
    predicted_boxes: torch.Tensor
    predicted_texts: list[str]
    title: str = ""


def comparison_grid(items: list[Comparison], columns: int = 4, title: str = "") -> Figure:
    """Images with true (green) and predicted (red, with score) boxes, `columns` per row."""
    n_rows = max(1, -(-len(items) // columns))
    n_cols = min(columns, max(1, len(items)))
    figure = grid_figure(n_rows, n_cols, (3.2, 3.1))
    axes = figure.subplots(n_rows, n_cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, item in zip(axes.flat, items, strict=False):
        ax.imshow(item.image)
        for boxes, texts, colour, below in (
            (item.true_boxes, item.true_texts, TRUE_COLOUR, False),
            (item.predicted_boxes, item.predicted_texts, PREDICTED_COLOUR, True),
        ):
            for (x0, y0, x1, y1), text in zip(boxes.tolist(), texts, strict=True):
                _box(ax, (x0, y0, x1, y1), colour)
                _tag(ax, (x0, y0, x1, y1), text, colour, below)
        ax.set_title(item.title, fontsize=8)
    if title:
        figure.suptitle(f"{title}  (green: truth, red: prediction)")
    return figure


def confusion_figure(matrix: torch.Tensor, classes: list[str], title: str = "") -> Figure:
    """Heat map of a (K, K) confusion matrix (rows: actual, columns: predicted), counts written."""
    size = min(MAX_WIDTH - 1, max(4.0, 0.4 * len(classes) + 2))
    figure = Figure(figsize=(size + 1, size), layout="constrained")
    ax = figure.subplots()
    image = ax.imshow(matrix.numpy(), cmap="Blues")
    figure.colorbar(image, ax=ax, shrink=0.8)
    ticks = np.arange(len(classes))
    ax.set_xticks(ticks, classes, rotation=90, fontsize=7)
    ax.set_yticks(ticks, classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    threshold = matrix.max().item() / 2
    for (i, j), count in np.ndenumerate(matrix.numpy()):
        if count:
            colour = "white" if count > threshold else "black"
            ax.text(j, i, str(count), ha="center", va="center", fontsize=7, color=colour)
    ax.set_title(title or "Confusion matrix")
    return figure


def training_curves(history: list[dict], best_epoch: int, title: str) -> Figure:
    """Per-epoch train and val curves of every measure in `history` (fit's), best epoch marked."""
    names = list(history[0]["val"])
    epochs = np.arange(1, len(history) + 1)
    n_cols = min(3, len(names))
    n_rows = -(-len(names) // n_cols)
    figure = Figure(figsize=(MAX_WIDTH, 2.6 * n_rows + 0.6), layout="constrained")
    axes = figure.subplots(n_rows, n_cols, squeeze=False).flat
    for ax in axes[len(names) :]:
        ax.axis("off")
    for ax, name in zip(axes, names, strict=False):
        for split, style in (("train", "--"), ("val", "-")):
            ax.plot(epochs, [h[split][name] for h in history], style, label=split)
        ax.axvline(best_epoch, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("epoch")
        ax.set_title(name, fontsize=9)
    figure.legend(*figure.axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=2)
    figure.suptitle(f"{title}: training curves (dotted: best epoch {best_epoch})")
    return figure


def _draw_boxes(ax: Axes, boxes: torch.Tensor, texts: list[str], colour, dashed=False, below=False):
    style = "--" if dashed else "-"
    for (x0, y0, x1, y1), text in zip(boxes.tolist(), texts, strict=True):
        _box(ax, (x0, y0, x1, y1), colour, style)
        _tag(ax, (x0, y0, x1, y1), text, colour, below, size=6.5, pad=0.8)


def _box(ax: Axes, box, colour, style: str = "-") -> None:
    """An xyxy box outline in `colour` with a dark edge (HALO)."""
    x0, y0, x1, y1 = box
    outline = Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=2.0, ec=colour, ls=style)
    outline.set_path_effects(HALO)
    ax.add_patch(outline)


def _tag(ax: Axes, box, text: str, colour, below: bool = False, size=7.0, pad=1.0) -> None:
    """A white label on a `colour` patch at the left of an xyxy box: on its top edge, or with
    `below` hanging from its bottom edge."""
    x0, y0, _, y1 = box
    ax.text(
        x0,
        y1 if below else y0,
        text,
        fontsize=size,
        color="black" if sum(to_rgb(colour)) > 1.5 else "white",  # readable on any label
        va="top" if below else "bottom",
        bbox={"facecolor": colour, "edgecolor": "none", "pad": pad},
    )


def nms_grid(rows: list[tuple[Comparison, Comparison]], title: str = "") -> Figure:
    """Per row one image twice: detections before and after NMS (red, with scores), the ground
    truth dashed green on both."""
    n_rows = max(1, len(rows))
    figure = Figure(figsize=(7.2, 3.4 * n_rows), layout="constrained")
    axes = figure.subplots(n_rows, 2, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, pair in enumerate(rows):
        for ax, item in zip(axes[r], pair, strict=True):
            ax.imshow(item.image)
            _draw_boxes(ax, item.true_boxes, item.true_texts, TRUE_COLOUR, dashed=True)
            _draw_boxes(
                ax, item.predicted_boxes, item.predicted_texts, PREDICTED_COLOUR, below=True
            )
            ax.set_title(item.title, fontsize=8)
    figure.suptitle(title or "Detections before and after NMS (dashed green: truth)")
    return figure


def pr_curves(curves: dict[str, tuple[list[float], list[float], float | None]]) -> Figure:
    """Precision-recall curve per class: {name: (recall, precision, AP)}, drawn as steps whose
    right-hand corner holds the precision (evaluate.pr_steps gives such points)."""
    figure = Figure(figsize=(7, 5), layout="constrained")
    ax = figure.subplots()
    for k, (name, (recall, precision, ap)) in enumerate(curves.items()):
        if ap is None:
            continue
        label = f"{name} ({ap:.2f})"
        ax.plot(
            recall, precision, color=class_colour(k), lw=1.5, drawstyle="steps-pre", label=label
        )
    ax.set_xlabel("recall")
    ax.set_ylabel("precision (interpolated, as AP measures it)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, ncols=2, loc="lower left", title="class (AP)", title_fontsize=8)
    ax.set_title("Precision-recall per class")
    return figure


def ap_chart(aps: dict[str, float | None], title: str) -> Figure:
    """Horizontal bars: AP per class (classes without ground truth shown as 'n/a')."""
    names = list(aps)
    figure = Figure(figsize=(7, 0.25 * len(names) + 1.2), layout="constrained")
    ax = figure.subplots()
    values = [aps[n] or 0.0 for n in names]
    bars = ax.barh(range(len(names)), values, color=[class_colour(k) for k in range(len(names))])
    ax.bar_label(
        bars,
        labels=[f"{aps[n]:.2f}" if aps[n] is not None else "n/a" for n in names],
        fontsize=7,
        padding=2,
    )
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.1)
    ax.set_xlabel("average precision")
    ax.set_title(title)
    return figure


def annotate(
    image: Image.Image,
    boxes: torch.Tensor,
    texts: list[str],
    class_ids: list[int],
    cells: torch.Tensor | None = None,
) -> Image.Image:
    """A copy of `image` at full resolution with (N, 4) xyxy pixel boxes drawn in their class
    colour, each with its text on a filled label; optional (M, 4) `cells` drawn as a thin grid.

    Drawn with PIL rather than matplotlib: the output keeps the photo's own pixels and size.
    """
    from PIL import ImageDraw, ImageFont

    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    short = min(out.size)
    width = max(3, round(short / 150))
    font = ImageFont.load_default(size=max(11, round(short / 40)))
    if cells is not None:
        for cell in cells.tolist():
            draw.rectangle(cell, outline=(255, 255, 255), width=1)
    for box, text, class_id in zip(boxes.tolist(), texts, class_ids, strict=True):
        colour = tuple(round(255 * c) for c in class_colour(class_id))
        # a dark line on both sides of the coloured one: visible on any photo
        draw.rectangle(box, outline=(0, 0, 0), width=width + 2)
        inner = [box[0] + 1, box[1] + 1, box[2] - 1, box[3] - 1]
        if inner[2] > inner[0] and inner[3] > inner[1]:
            draw.rectangle(inner, outline=colour, width=width)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        x = min(max(box[0], 0), max(out.width - (right - left) - 2 * width, 0))
        y = box[1] - (bottom - top) - 2 * width  # above the box, or inside it at the image top
        y = box[1] if y < 0 else y
        label = (x, y, x + right - left + 2 * width, y + bottom - top + 2 * width)
        draw.rectangle(label, fill=colour)
        ink = (0, 0, 0) if sum(colour) > 380 else (255, 255, 255)  # readable on light or dark
        draw.text((x + width - left, y + width - top), text, fill=ink, font=font)
    return out


def error_chart(gains: dict[str, float], counts: dict[str, int], title: str) -> Figure:
    """Horizontal bars: the mAP each error type would give back if fixed alone (errortypes.py),
    each bar labelled with its gain and how many errors of the type there are."""
    names = list(gains)
    figure = Figure(figsize=(7, 0.3 * len(names) + 1.3), layout="constrained")
    ax = figure.subplots()
    bars = ax.barh(range(len(names)), [gains[n] for n in names], color="#4c72b0")
    labels = [f"{gains[n]:.3f} ({counts[n]} errors)" for n in names]
    ax.bar_label(bars, labels=labels, fontsize=7, padding=2)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max(0.05, max(gains.values(), default=0.0) * 1.45))
    ax.set_xlabel("mAP gained if this type alone were fixed")
    ax.set_title(title)
    return figure


MISSED_COLOUR = "#ff7f0e"


@dataclass
class Outcomes:
    """What a head's detections did on one image, xyxy pixels with a text each: the detections
    that found an object, the false ones, and the objects nobody found."""

    found: torch.Tensor
    found_texts: list[str]
    false: torch.Tensor
    false_texts: list[str]
    missed: torch.Tensor
    missed_texts: list[str]
    title: str = ""


def outcome_pair(image: Image.Image, pair: tuple[Outcomes, Outcomes], title: str) -> Figure:
    """One photo twice, as two revisions' detections left it: found (green), false (red) and
    missed objects (orange, dashed)."""
    figure = Figure(figsize=(MAX_WIDTH, 3.8), layout="constrained")
    for ax, outcomes in zip(figure.subplots(1, 2), pair, strict=True):
        ax.axis("off")
        ax.imshow(image)
        _draw_boxes(ax, outcomes.missed, outcomes.missed_texts, MISSED_COLOUR, dashed=True)
        _draw_boxes(ax, outcomes.false, outcomes.false_texts, PREDICTED_COLOUR, below=True)
        _draw_boxes(ax, outcomes.found, outcomes.found_texts, TRUE_COLOUR)
        ax.set_title(outcomes.title, fontsize=8)
    figure.suptitle(f"{title}  (green: found, red: false, orange dashed: missed)", fontsize=9)
    return figure
