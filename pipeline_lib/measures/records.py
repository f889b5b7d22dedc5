"""Per-image records of an evaluation: what the head gave on each val image and how it was
judged, so that a review can resample the images (bootstrap.py), split the errors (errortypes.py)
and find the images a change moved, without the model or the features.

An evaluate stage writes its records to a folder (`write_records`; a DVC output, cached: it grows
with the data):
- `records.json`: the kind ("multi" or "single"), the classes, how detections were judged
  (`iou_threshold`, `overlap`, `draw_score`) and the dataset folder the image paths start from;
- `images.parquet`: one row per val image in feature-row order (image_id, path, width, height;
  the single head's rows add its label, prediction, score, IoU and both boxes in pixels);
- multi only, `detections.parquet`: one row per detection (image_id, class_id, score, box in the
  photo's pixels, `outcome` under the devkit's matching at `iou_threshold`, the `object` it took
  or -1, and `coco`: its outcome at each of COCO's ten IoU thresholds), and `objects.parquet`:
  one row per object (image_id, its index in the image, class_id, box, difficult).
Outcomes are metrics.TRUE_POSITIVE, FALSE_POSITIVE and IGNORED.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline_lib.base.errors import PipelineError
from pipeline_lib.base.files import atomic_dir
from pipeline_lib.measures.bootstrap import map_draws, ranked_classes
from pipeline_lib.measures.metrics import COCO_IOUS, COCO_RECALLS, coco_match_image, match_image

BOX = ["xmin", "ymin", "xmax", "ymax"]
FORMAT = 1  # records.json's "format": a reader of a newer format refuses it by name
Pairs = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Judging:
    """How detections were judged: a hit from `iou_threshold` under `overlap` (metrics.OVERLAPS);
    figures of images show detections scoring `draw_score` or more."""

    iou_threshold: float
    overlap: str
    draw_score: float


@dataclass
class MultiRecords:
    """A grid head's detections on the val images, judged (see the module docstring)."""

    classes: list[str]
    judging: Judging
    dataset_dir: str
    images: pd.DataFrame
    detections: pd.DataFrame
    objects: pd.DataFrame
    kind: str = field(default="multi", init=False)

    FIGURES = ("map", "coco_map")  # the headline figures a bootstrap gives intervals of

    def restricted(self, image_ids: list[str]) -> MultiRecords:
        """The records of `image_ids` only, in that order (each must be here)."""
        return MultiRecords(
            self.classes,
            self.judging,
            self.dataset_dir,
            _rows_of(self.images, image_ids),
            _in_images(self.detections, image_ids),
            _in_images(self.objects, image_ids),
        )

    def pairs(self) -> tuple[Pairs, Pairs]:
        """Per image in `images` order: (detections (boxes, scores, labels), truth (boxes, labels,
        difficult)), as metrics.voc_average_precision takes them."""
        found = self.detections.groupby("image_id", sort=False)
        truth = self.objects.groupby("image_id", sort=False)
        detections, objects = [], []
        for image_id in self.images["image_id"]:
            d = found.get_group(image_id) if image_id in found.groups else self.detections[:0]
            g = truth.get_group(image_id) if image_id in truth.groups else self.objects[:0]
            detections.append(
                (
                    _boxes(d),
                    torch.tensor(d["score"].to_numpy(), dtype=torch.float64),
                    torch.tensor(d["class_id"].to_numpy(), dtype=torch.int64),
                )
            )
            objects.append(
                (
                    _boxes(g),
                    torch.tensor(g["class_id"].to_numpy(), dtype=torch.int64),
                    torch.tensor(g["difficult"].to_numpy(), dtype=torch.bool),
                )
            )
        return detections, objects

    def figure_draws(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each of FIGURES on each draw of `weights` (D, I over `images`): (D,) devkit mAP at
        the judging's IoU and COCO mAP@[.5:.95]; all-ones weights give the evaluation's own."""
        d = self.detections
        index = {image_id: i for i, image_id in enumerate(self.images["image_id"])}
        image = torch.tensor(d["image_id"].map(index).to_numpy(dtype=np.int64))
        scores = torch.tensor(d["score"].to_numpy(dtype=np.float64))
        labels = torch.tensor(d["class_id"].to_numpy(dtype=np.int64))
        positives = self._positives(index)
        coco = np.zeros((0, len(COCO_IOUS)), dtype=np.int8)
        if len(d):
            coco = np.stack(d["coco"].to_numpy())
        figures = {}
        for name, outcome, points in (
            ("map", d["outcome"].to_numpy(dtype=np.int8)[:, None], None),
            ("coco_map", coco, COCO_RECALLS),
        ):
            ranked = ranked_classes(scores, labels, image, torch.tensor(outcome), positives)
            figures[name] = map_draws(ranked, weights, points)
        return figures

    def _positives(self, index: dict[str, int]) -> torch.Tensor:
        """(I, K) objects to find (not difficult) per image and class."""
        counted = self.objects[~self.objects["difficult"]]
        rows = counted["image_id"].map(index).to_numpy(dtype=np.int64)
        cells = rows * len(self.classes) + counted["class_id"].to_numpy(dtype=np.int64)
        flat = np.bincount(cells, minlength=len(self.images) * len(self.classes))
        return torch.from_numpy(flat.reshape(len(self.images), len(self.classes)))


@dataclass
class SingleRecords:
    """The single-object head's guess on each val image with an object: the largest object's
    `label`, the `predicted` class and its `score`, the `iou` of the predicted box with the
    true one, both boxes in the photo's pixels (true_xmin ..., pred_xmin ...)."""

    classes: list[str]
    judging: Judging
    dataset_dir: str
    images: pd.DataFrame
    kind: str = field(default="single", init=False)

    FIGURES = ("accuracy", "mean_iou")

    def restricted(self, image_ids: list[str]) -> SingleRecords:
        rows = _rows_of(self.images, image_ids)
        return SingleRecords(self.classes, self.judging, self.dataset_dir, rows)

    def figure_draws(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """(D,) accuracy and mean IoU on each draw of `weights` (D, I over `images`)."""
        weights = weights.double()
        rows = self.images
        correct = torch.tensor((rows["label"] == rows["predicted"]).to_numpy(), dtype=torch.float64)
        iou = torch.tensor(rows["iou"].to_numpy(), dtype=torch.float64)
        total = weights.sum(1)
        return {
            "accuracy": weights @ correct / total,
            "mean_iou": weights @ iou / total,
        }


Records = MultiRecords | SingleRecords


def multi_records(
    images: pd.DataFrame,
    found: Pairs,
    truth: Pairs,
    classes: list[str],
    judging: Judging,
    dataset_dir: str,
) -> MultiRecords:
    """Records of a grid head: `images` (image_id, path, width, height) in the order of `found`
    (per image: boxes (D, 4) xyxy pixels, scores, labels) and `truth` (boxes, labels,
    difficult), each detection judged by the devkit's rules and COCO's."""
    judged = [
        (
            *match_image(dets, objs, judging.iou_threshold, judging.overlap),
            coco_match_image(dets, objs),
        )
        for dets, objs in zip(found, truth, strict=True)
    ]
    ids = images["image_id"].to_numpy()
    detections = pd.DataFrame(
        {
            "image_id": np.repeat(ids, [len(d[1]) for d in found]),
            "class_id": _joined([d[2] for d in found], torch.int32),
            "score": _joined([d[1] for d in found], torch.float64),
            **dict(zip(BOX, _joined([d[0] for d in found], torch.float64, 4).T, strict=True)),
            "outcome": _joined([j[0] for j in judged], torch.int8),
            "object": _joined([j[1] for j in judged], torch.int32),
        }
    )
    coco = _joined([j[2] for j in judged], torch.int8, len(COCO_IOUS))
    detections["coco"] = pd.Series(list(coco), index=detections.index, dtype=object)
    objects = pd.DataFrame(
        {
            "image_id": np.repeat(ids, [len(g[1]) for g in truth]),
            "object": _joined([torch.arange(len(g[1])) for g in truth], torch.int32),
            "class_id": _joined([g[1] for g in truth], torch.int32),
            **dict(zip(BOX, _joined([g[0] for g in truth], torch.float64, 4).T, strict=True)),
            "difficult": _joined([g[2] for g in truth], torch.bool),
        }
    )
    return MultiRecords(
        classes,
        judging,
        dataset_dir,
        images[["image_id", "path", "width", "height"]].reset_index(drop=True),
        detections,
        objects,
    )


def _joined(parts: list[torch.Tensor], dtype: torch.dtype, width: int | None = None) -> np.ndarray:
    """The tensors concatenated along their first dimension as one numpy array of `dtype`
    ((N,) or (N, width))."""
    shape = (0,) if width is None else (0, width)
    return torch.cat(
        [torch.zeros(shape, dtype=dtype), *[t.to(dtype).reshape(-1, *shape[1:]) for t in parts]]
    ).numpy()


IMAGE_FIELDS = [
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("path", pa.string(), nullable=False),  # relative to the dataset folder
    pa.field("width", pa.int32(), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
]
IMAGE_SCHEMA = pa.schema(IMAGE_FIELDS)
SINGLE_SCHEMA = pa.schema(
    IMAGE_FIELDS
    + [
        pa.field("label", pa.int32(), nullable=False),
        pa.field("predicted", pa.int32(), nullable=False),
        pa.field("score", pa.float32(), nullable=False),
        pa.field("iou", pa.float64(), nullable=False),
    ]
    + [pa.field(f"true_{c}", pa.float64(), nullable=False) for c in BOX]
    + [pa.field(f"pred_{c}", pa.float64(), nullable=False) for c in BOX]
)
DETECTION_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("class_id", pa.int32(), nullable=False),
        pa.field("score", pa.float64(), nullable=False),  # as ranked, at full precision
        *[pa.field(c, pa.float64(), nullable=False) for c in BOX],
        pa.field("outcome", pa.int8(), nullable=False),
        pa.field("object", pa.int32(), nullable=False),
        pa.field("coco", pa.list_(pa.int8(), len(COCO_IOUS)), nullable=False),
    ]
)
OBJECT_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("object", pa.int32(), nullable=False),
        pa.field("class_id", pa.int32(), nullable=False),
        *[pa.field(c, pa.float64(), nullable=False) for c in BOX],
        pa.field("difficult", pa.bool_(), nullable=False),
    ]
)
TABLES = {  # kind -> {file: schema}
    "multi": {
        "images.parquet": IMAGE_SCHEMA,
        "detections.parquet": DETECTION_SCHEMA,
        "objects.parquet": OBJECT_SCHEMA,
    },
    "single": {"images.parquet": SINGLE_SCHEMA},
}
KINDS = {"multi": MultiRecords, "single": SingleRecords}


def write_records(records: Records, folder: Path) -> None:
    """Write `records` as the folder `folder` (replaced as a whole, atomically)."""
    frames = {"images.parquet": records.images}
    if records.kind == "multi":
        frames |= {"detections.parquet": records.detections, "objects.parquet": records.objects}
    info = {
        "format": FORMAT,
        "kind": records.kind,
        "classes": records.classes,
        "iou_threshold": records.judging.iou_threshold,
        "overlap": records.judging.overlap,
        "draw_score": records.judging.draw_score,
        "dataset_dir": records.dataset_dir,
    }
    with atomic_dir(folder) as tmp:
        for name, schema in TABLES[records.kind].items():
            table = pa.Table.from_pandas(frames[name], schema=schema, preserve_index=False)
            pq.write_table(table, tmp / name)
        (tmp / "records.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def read_records(folder: Path) -> Records:
    """The records in `folder`, as `write_records` wrote them; a clear error naming the file
    when one is missing or of another format."""
    meta = folder / "records.json"
    try:
        info = json.loads(meta.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{meta} not found: no per-image records in {folder}") from None
    except json.JSONDecodeError as error:
        raise PipelineError(f"{meta} is not valid JSON: {error}") from None
    if info.get("format") != FORMAT or info.get("kind") not in KINDS:
        raise PipelineError(
            f"{meta}: records of format {info.get('format')!r}, kind {info.get('kind')!r}; "
            f"this version reads format {FORMAT}, kinds {sorted(KINDS)}"
        )
    judging = Judging(info["iou_threshold"], info["overlap"], info["draw_score"])
    tables = []
    for name, schema in TABLES[info["kind"]].items():
        try:
            tables.append(pq.read_table(folder / name, schema=schema).to_pandas())
        except (OSError, pa.ArrowException) as error:
            raise PipelineError(f"{folder / name}: cannot read the records: {error}") from None
    return KINDS[info["kind"]](info["classes"], judging, info["dataset_dir"], *tables)


def _boxes(frame: pd.DataFrame) -> torch.Tensor:
    return torch.tensor(frame[BOX].to_numpy(), dtype=torch.float64).reshape(-1, 4)


def _rows_of(images: pd.DataFrame, image_ids: list[str]) -> pd.DataFrame:
    return images.set_index("image_id").loc[image_ids].reset_index()


def _in_images(frame: pd.DataFrame, image_ids: list[str]) -> pd.DataFrame:
    """The rows of `frame` whose image is in `image_ids`, grouped in that order (each image's
    rows in their order)."""
    rank = {image_id: i for i, image_id in enumerate(image_ids)}
    position = frame["image_id"].map(rank)
    kept = frame[position.notna()]
    order = np.argsort(position[position.notna()].to_numpy(), kind="stable")
    return kept.iloc[order].reset_index(drop=True)
