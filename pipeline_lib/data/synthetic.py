"""A deterministic synthetic detection dataset written in VOCdevkit layout.

Scenes are textured, noisy backgrounds with 1..`max_objects` filled shapes (circle, square,
triangle, star, hexagon, cross) of random colour, size (from tiny to most of the image) and aspect
ratio, drawn in order so that later shapes may cover earlier ones. Image sizes vary, so the image
modes shrink and crop give different pictures. Annotation flags follow VOC's meaning:

- `truncated`: the shape extends beyond the image border (its box is clipped to the image);
- `difficult`: the box is narrower or shorter than `difficult_below` pixels;
- `occluded`: the box overlaps the box of a shape drawn later (on top of it).

Everything derives from `seed` and the image index (one random generator per image), so the same
parameters give byte-identical annotations, and image i does not depend on how many are generated.
Downstream code reads the result through the same VOC parser as real data.
"""

from __future__ import annotations

import math
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from pipeline_lib.base.files import atomic_dir
from pipeline_lib.base.params import SyntheticParams

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross")
_MIN_BOX = 4  # pixels: smaller shapes are not drawn, so every box has a real extent


def _unit_polygon(shape: str) -> np.ndarray:
    """(K, 2) vertices in [-1, 1]^2 with an extent of exactly 2 along x and y (circle: None)."""
    if shape == "square":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=float)
    if shape == "triangle":
        return np.array([[0, -1], [1, 1], [-1, 1]], dtype=float)
    if shape == "hexagon":
        angles = np.deg2rad(np.arange(6) * 60.0)
        points = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    elif shape == "star":
        angles = np.deg2rad(np.arange(10) * 36.0 - 90.0)
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        points = np.stack([np.cos(angles) * radii, np.sin(angles) * radii], axis=1)
    elif shape == "cross":
        a = 0.35
        points = np.array(
            [
                [-a, -1],
                [a, -1],
                [a, -a],
                [1, -a],
                [1, a],
                [a, a],
                [a, 1],
                [-a, 1],
                [-a, a],
                [-1, a],
                [-1, -a],
                [-a, -a],
            ],
            dtype=float,
        )
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    # Stretch to fill [-1, 1]^2 so that the requested width/height is the true box size.
    low, high = points.min(axis=0), points.max(axis=0)
    return (points - low) / (high - low) * 2.0 - 1.0


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """(H, W, 3) uint8: a smooth random colour field, optional stripes, and pixel noise."""
    cells = rng.integers(2, 7, size=2)
    coarse = rng.integers(0, 256, size=(cells[0], cells[1], 3), dtype=np.uint8)
    field = np.asarray(
        Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32
    )
    if rng.random() < 0.5:  # stripes at a random angle and period
        theta, period = rng.uniform(0, math.pi), rng.uniform(6, 40)
        ys, xs = np.mgrid[0:height, 0:width]
        wave = np.sin((xs * math.cos(theta) + ys * math.sin(theta)) * 2 * math.pi / period)
        field += (wave * rng.uniform(10, 40))[..., None]
    field += rng.normal(0.0, rng.uniform(4, 20), size=(height, width, 1 + 2 * (rng.random() < 0.5)))
    return np.clip(field, 0, 255).astype(np.uint8)


def render_scene(params: SyntheticParams, index: int) -> tuple[Image.Image, list[dict]]:
    """Draw scene `index`; return the image and its objects (VOC 1-based pixel boxes and flags)."""
    rng = np.random.default_rng([params.seed, index])
    width, height = (int(v) for v in rng.integers(params.min_side, params.max_side + 1, size=2))
    image = Image.fromarray(_background(rng, width, height))
    draw = ImageDraw.Draw(image)
    objects = []
    for _ in range(int(rng.integers(1, params.max_objects + 1))):
        name = params.classes[int(rng.integers(len(params.classes)))]
        side = min(width, height) * math.exp(rng.uniform(math.log(0.05), math.log(0.9)))
        aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
        w = max(_MIN_BOX, side * math.sqrt(aspect))
        h = max(_MIN_BOX, side / math.sqrt(aspect))
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)  # centre inside: >= half visible
        x0, y0, x1, y1 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        outline = (0, 0, 0) if rng.random() < 0.5 else None
        if name == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=colour, outline=outline, width=2)
        else:
            points = _unit_polygon(name) * (w / 2, h / 2) + (cx, cy)
            draw.polygon([tuple(p) for p in points], fill=colour, outline=outline, width=2)
        # VOC boxes are 1-based inclusive pixel indices, clipped to the image.
        box = (
            max(0, math.floor(x0)) + 1,
            max(0, math.floor(y0)) + 1,
            min(width - 1, math.ceil(x1) - 1) + 1,
            min(height - 1, math.ceil(y1) - 1) + 1,
        )
        objects.append(
            {
                "name": name,
                "box": box,
                "truncated": x0 < 0 or y0 < 0 or x1 > width or y1 > height,
                "difficult": min(box[2] - box[0], box[3] - box[1]) < params.difficult_below,
                "occluded": False,
            }
        )
    for i, below in enumerate(objects):
        below["occluded"] = any(_overlap(below["box"], above["box"]) for above in objects[i + 1 :])
    return image, objects


def annotation_xml(image_id: str, width: int, height: int, objects: list[dict]) -> str:
    """The VOC XML text for one image (same element order as the VOC files)."""
    parts = [
        "<annotation>",
        "\t<folder>VOCshapes</folder>",
        f"\t<filename>{escape(image_id)}.jpg</filename>",
        "\t<source>",
        "\t\t<database>Synthetic shapes</database>",
        "\t</source>",
        "\t<size>",
        f"\t\t<width>{width}</width>",
        f"\t\t<height>{height}</height>",
        "\t\t<depth>3</depth>",
        "\t</size>",
        "\t<segmented>0</segmented>",
    ]
    for obj in objects:
        xmin, ymin, xmax, ymax = obj["box"]
        parts += [
            "\t<object>",
            f"\t\t<name>{escape(obj['name'])}</name>",
            "\t\t<pose>Unspecified</pose>",
            f"\t\t<truncated>{int(obj['truncated'])}</truncated>",
            f"\t\t<occluded>{int(obj['occluded'])}</occluded>",
            f"\t\t<difficult>{int(obj['difficult'])}</difficult>",
            "\t\t<bndbox>",
            f"\t\t\t<xmin>{xmin}</xmin>",
            f"\t\t\t<ymin>{ymin}</ymin>",
            f"\t\t\t<xmax>{xmax}</xmax>",
            f"\t\t\t<ymax>{ymax}</ymax>",
            "\t\t</bndbox>",
            "\t</object>",
        ]
    parts.append("</annotation>")
    return "\n".join(parts) + "\n"


def image_id(index: int) -> str:
    return f"{index:06d}"


def _write_scene(args: tuple[SyntheticParams, int, Path]) -> None:
    params, index, dataset_dir = args
    image, objects = render_scene(params, index)
    name = image_id(index)
    image.save(dataset_dir / "JPEGImages" / f"{name}.jpg", quality=90)
    xml = annotation_xml(name, image.width, image.height, objects)
    (dataset_dir / "Annotations" / f"{name}.xml").write_text(xml, encoding="utf-8")


def generate_dataset(
    dataset_dir: str | Path, params: SyntheticParams, workers: int = 1, progress: bool = True
) -> None:
    """Write the dataset to `dataset_dir` (JPEGImages/, Annotations/, ImageSets/Main/).

    Images 0..n_train-1 form the `train` list, the next n_val the `val` list, both `trainval`.
    The folder is replaced as a whole only once complete.
    """
    n = params.n_train + params.n_val
    with atomic_dir(dataset_dir) as tmp:
        for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
            (tmp / sub).mkdir(parents=True)
        jobs = [(params, i, tmp) for i in range(n)]
        bar = tqdm(total=n, desc="generate scenes", unit="image", disable=not progress)
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                for _ in pool.map(_write_scene, jobs, chunksize=32):
                    bar.update()
        else:
            for job in jobs:
                _write_scene(job)
                bar.update()
        bar.close()
        ids = [image_id(i) for i in range(n)]
        lists = {"train": ids[: params.n_train], "val": ids[params.n_train :], "trainval": ids}
        for split, members in lists.items():
            text = "".join(f"{m}\n" for m in members)
            (tmp / "ImageSets" / "Main" / f"{split}.txt").write_text(text, encoding="utf-8")


def _overlap(a: tuple, b: tuple) -> bool:
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])
