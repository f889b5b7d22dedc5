"""MS COCO-format detection datasets, read into the same rows as `voc.read_voc`, and VOC -> COCO.

Layout (as COCO 2017 ships it): `<root>/annotations/instances_<split>.json` and the images in
`<root>/<split>/`. Rules:

- Classes are the JSON's `categories` in id order, with their names; the COCO category ids are
  kept in `dataset.json` (`coco_category_ids`, in class order). Every split must list the same
  categories.
- Image ids are the file names without extension (`000000391895.jpg` -> `000000391895`), unique
  across splits; `file_name` must be a bare file name in `<split>/` (no path components).
- A COCO `bbox` is [x, y, width, height] in pixels; the tables hold xmin = x, ymin = y,
  xmax = x + width, ymax = y + height: the same continuous coordinates, no pixel shift, so VOC ->
  COCO -> tables returns the VOC tables exactly. Boxes must be finite with a positive size; COCO's
  own boxes can overhang the image by a fraction of a pixel, so up to 1 pixel outside is clipped,
  more is an error.
- `iscrowd: 1` regions become `difficult` objects (VOC's "ignore in evaluation"); `truncated` is
  False, `occluded` missing, `pose` "Unspecified". Images without annotations are kept.
- JSON is parsed with the standard library (data only, nothing executed). Errors name the file and
  the field, e.g. `instances_val.json: annotations[12].bbox: [3, 4, -1, 5] has no area`; with
  `on_error="skip"` the image concerned is dropped and recorded, as for VOC.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline_lib.base.files import write_json
from pipeline_lib.data.voc import (
    IMAGE_ID,
    AnnotationError,
    DatasetError,
    VocRows,
    is_bare_filename,
    read_image_size,
    read_voc,
)

OVERHANG = 1.0  # pixels a COCO box may extend past the image before it is an error


def annotation_path(root: Path, split: str) -> Path:
    return root / "annotations" / f"instances_{split}.json"


def read_categories(path: Path, data: dict | None = None) -> tuple[list[str], list[int]]:
    """(class names, category ids), in category id order, of one instances file (`data`: its
    parsed content, when already loaded)."""
    data = _load(path) if data is None else data
    try:
        categories = sorted((int(c["id"]), str(c["name"])) for c in data["categories"])
    except (KeyError, TypeError, ValueError) as error:
        raise DatasetError(f"{path}: categories: each needs an id and a name ({error})") from None
    names = [name for _, name in categories]
    if not names or len(set(names)) != len(names):
        raise DatasetError(f"{path}: categories: none, or names listed twice: {names}")
    return names, [i for i, _ in categories]


def read_coco(
    root: str | Path,
    splits: Mapping[str, str],
    on_error: str = "raise",
    progress: bool = True,
) -> tuple[VocRows, list[str], list[int]]:
    """Read the images of several splits, e.g. `{"train": "train2017", "val": "val2017"}`.

    Returns the rows (as `read_voc`), the class names and their COCO category ids; the first
    split's categories define the classes.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    root = Path(root)
    rows, seen = VocRows(), {}
    names: list[str] = []
    category_ids: list[int] = []
    for role, split in splits.items():
        path = annotation_path(root, split)
        data = _load(path)
        if not names:
            names, category_ids = read_categories(path, data)
        elif read_categories(path, data) != (names, category_ids):
            raise DatasetError(f"{path}: categories differ from those of the {role} split")
        images = _list(path, data, "images")
        label = {cid: k for k, cid in enumerate(category_ids)}
        source = _Split(root, split, path, _annotations_by_image(path, data, images), label, names)
        bar = tqdm(images, desc=f"read {path.name}", unit="image", disable=not progress)
        for n, entry in enumerate(bar):
            try:
                image, objects = _image_rows(source, n, entry)
                if image["image_id"] in seen:
                    where, other = f"images[{n}].file_name", seen[image["image_id"]]
                    raise AnnotationError(path, where, f"{image['image_id']!r} also in {other}")
            except AnnotationError as error:
                if on_error == "raise":
                    raise
                name = entry.get("file_name") if isinstance(entry, dict) else None
                image_id = Path(name).stem if isinstance(name, str) else f"images[{n}]"
                rows.skipped.append({"image_id": image_id, "split": role, "reason": str(error)})
                continue
            seen[image["image_id"]] = path.name
            image["split"] = role
            rows.images.append(image)
            rows.objects.extend(objects)
    return rows, names, category_ids


def _annotations_by_image(
    path: Path, data: dict, images: list
) -> dict[Any, list[tuple[int, dict]]]:
    """(index, annotation) per image id; DatasetError for annotations of no image."""
    by_image: dict[Any, list[tuple[int, dict]]] = {}
    for n, ann in enumerate(_list(path, data, "annotations")):
        key = ann.get("image_id") if isinstance(ann, dict) else None
        by_image.setdefault(key, []).append((n, ann))
    orphans = set(by_image) - {e.get("id") for e in images if isinstance(e, dict)}
    if orphans:  # objects that would silently vanish
        n = by_image[next(iter(orphans))][0][0]
        raise DatasetError(
            f"{path}: annotations: {sum(len(by_image[o]) for o in orphans)} "
            f"refer to no image (e.g. annotations[{n}])"
        )
    return by_image


@dataclass
class _Split:
    """One split's instances file, read: what its image entries are checked against."""

    root: Path
    split: str
    path: Path  # the instances file
    by_image: dict[Any, list[tuple[int, dict]]]
    label: dict[int, int]  # COCO category id -> class id
    names: list[str]


def _image_rows(source: _Split, n: int, entry: Any) -> tuple[dict, list[dict]]:
    """Entry `n` of `images` in the split's instances file -> (image row, object rows)."""
    path, where = source.path, f"images[{n}]"
    if not isinstance(entry, dict):
        raise AnnotationError(path, where, "not an object")
    file_name = entry.get("file_name")
    if not isinstance(file_name, str) or not is_bare_filename(file_name):
        raise AnnotationError(path, f"{where}.file_name", f"{file_name!r} is not a plain file name")
    image_id = Path(file_name).stem
    if not IMAGE_ID.match(image_id):
        raise AnnotationError(path, f"{where}.file_name", f"{image_id!r} is not a plain image id")
    width, height = (_whole(path, f"{where}.{k}", entry.get(k)) for k in ("width", "height"))
    image_rel = Path(source.split) / file_name
    real = read_image_size(source.root / image_rel, path)
    if real != (width, height):
        raise AnnotationError(
            path, f"{where}.width", f"says {width}x{height} but {image_rel} is {real[0]}x{real[1]}"
        )
    objects = [
        _object_row(source, m, ann, k, (image_id, width, height))
        for k, (m, ann) in enumerate(source.by_image.get(entry.get("id"), []))
    ]
    image = {
        "image_id": image_id,
        "path": image_rel.as_posix(),
        "annotation": path.relative_to(source.root).as_posix(),
        "filename": file_name,
        "width": width,
        "height": height,
        "depth": 3,
        "segmented": False,
        "n_objects": len(objects),
    }
    return image, objects


def _object_row(source: _Split, m: int, ann: dict, k: int, image: tuple[str, int, int]) -> dict:
    """Annotation `m` of the instances file, object `k` of `image` (id, width, height)."""
    image_id, width, height = image
    at = f"annotations[{m}]"
    category = ann.get("category_id")
    if category not in source.label:
        raise AnnotationError(source.path, f"{at}.category_id", f"{category!r} is not a category")
    xmin, ymin, xmax, ymax = _box(source.path, f"{at}.bbox", ann.get("bbox"), width, height)
    return {
        "image_id": image_id,
        "object_index": k,
        "class_name": source.names[source.label[category]],
        "class_id": source.label[category],
        "xmin": xmin,
        "ymin": ymin,
        "xmax": xmax,
        "ymax": ymax,
        "difficult": bool(ann.get("iscrowd", 0)),
        "truncated": False,
        "occluded": None,
        "pose": "Unspecified",
    }


def _box(path: Path, where: str, bbox: Any, width: int, height: int) -> tuple[float, ...]:
    numbers = isinstance(bbox, list) and all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in bbox
    )
    if not numbers or len(bbox) != 4:
        raise AnnotationError(path, where, f"{bbox!r} is not [x, y, width, height]")
    x, y, w, h = (float(v) for v in bbox)
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        raise AnnotationError(path, where, f"{bbox!r} has no area or is not finite")
    if x < -OVERHANG or y < -OVERHANG or x + w > width + OVERHANG or y + h > height + OVERHANG:
        raise AnnotationError(path, where, f"{bbox!r} lies outside the {width}x{height} image")
    xmin, ymin = max(x, 0.0), max(y, 0.0)
    xmax, ymax = min(x + w, float(width)), min(y + h, float(height))
    if xmax <= xmin or ymax <= ymin:
        raise AnnotationError(path, where, f"{bbox!r} lies outside the {width}x{height} image")
    return xmin, ymin, xmax, ymax


def _whole(path: Path, where: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AnnotationError(path, where, f"{value!r} is not a positive whole number")
    return value


def _load(path: Path) -> dict:
    if not path.is_file():
        raise DatasetError(f"{path}: COCO annotation file not found")
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: not a COCO instances file (top level is not an object)")
    return data


def _list(path: Path, data: dict, key: str) -> list:
    value = data.get(key)
    if not isinstance(value, list):
        raise DatasetError(f"{path}: {key}: missing or not a list")
    return value


def voc_to_coco(
    dataset_dir: str | Path, split: str, classes: list[str], out_root: str | Path
) -> Path:
    """Write VOC split `split` of `dataset_dir` as `<out_root>/annotations/instances_<split>.json`
    and make `<out_root>/<split>` a link to its JPEGImages folder (no image is copied). Categories
    get ids 1..K in `classes` order; difficult objects become `iscrowd: 1`. Returns the JSON path.
    """
    dataset_dir, out_root = Path(dataset_dir), Path(out_root)
    rows = read_voc(dataset_dir, {split: split}, classes, progress=False)
    images, annotations = [], []
    for n, image in enumerate(rows.images, start=1):
        images.append(
            {
                "id": n,
                "file_name": image["filename"],
                "width": image["width"],
                "height": image["height"],
            }
        )
        image["coco_id"] = n
    coco_ids = {image["image_id"]: image["coco_id"] for image in rows.images}
    for n, obj in enumerate(rows.objects, start=1):
        w, h = obj["xmax"] - obj["xmin"], obj["ymax"] - obj["ymin"]
        annotations.append(
            {
                "id": n,
                "image_id": coco_ids[obj["image_id"]],
                "category_id": obj["class_id"] + 1,
                "bbox": [obj["xmin"], obj["ymin"], w, h],
                "area": w * h,
                "iscrowd": int(obj["difficult"]),
            }
        )
    data = {
        "info": {"description": f"{dataset_dir.name} {split}, converted from PASCAL VOC"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": name} for k, name in enumerate(classes)],
    }
    out = annotation_path(out_root, split)
    write_json(out, data)
    link = out_root / split
    if not link.exists():
        link.symlink_to((dataset_dir / "JPEGImages").resolve(), target_is_directory=True)
    return out
