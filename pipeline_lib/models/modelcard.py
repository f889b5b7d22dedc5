"""The model card: everything a checkpoint says about its model, as one typed object.

A card is written into every model file (checkpoints.py) and is enough to rebuild the head and to
run it on new images: the head's kind and keyword arguments, the grid, the classes, the feature
shape and the dtype the training features were stored in, the backbone (name, layer, weights,
normalisation, the precision it ran in: absent in models older than backbone.precision, which ran
in float32), the image mode and size, and summaries of training (and of fine-tuning).

On disk the card is a JSON object (`to_dict`). Format 1 is the layout every model file has had
since anchors and two-level heads came in; it carries no version key, so models written before the
card existed load unchanged and new models hash as they did. A later format writes
`"format": N` and `from_dict` dispatches on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline_lib.base.errors import PipelineError
from pipeline_lib.boxes.geometry import ImageSpec

CARD_FORMAT = 1
KINDS = ("single", "multi")


class CardError(PipelineError, ValueError):
    """A model description that this pipeline cannot read (the message says which key)."""


@dataclass(frozen=True)
class GridSpec:
    """The grid head's layout: S x S cells; optional (A, 2) anchors (w, h image fractions); with
    a second, 2S x 2S level (backbone.fine_layer), its channels in the packed features and the
    object scale below which objects belong to it."""

    num_cells: int
    anchors: list[list[float]] | None = None
    fine_channels: int = 0
    fine_below: float | None = None
    assign: str = "centre"  # grid.assign: which cells learned an object (targets.GridLevel)
    anchor_ratio: float | None = None  # which anchor slots: None the best anchor's, else YOLOv5's


@dataclass
class ModelCard:
    kind: str  # "single" | "multi"
    head: dict[str, Any]  # the head class's keyword arguments (hidden, dropout, ...)
    classes: list[str]
    feature_shape: list[int]  # (C, H, W) of one image's features
    feature_dtype: str  # the training features' store dtype: inputs are rounded to it
    backbone: dict[str, Any]  # Backbone.describe() (name, layer, weights, mean, std) + precision
    image: ImageSpec
    train: dict[str, Any] = field(default_factory=dict)  # best epoch, monitor, epochs
    grid: GridSpec | None = None  # kind "multi" only
    collisions: dict[str, Any] | None = None  # per split: objects, dropped (grid heads)
    finetuned: dict[str, Any] | None = None  # fine-tuned models: best epoch, units trained

    def to_dict(self) -> dict[str, Any]:
        """The JSON object stored in the model file (format 1, keys in their historical order)."""
        out: dict[str, Any] = {"kind": self.kind, "head": self.head}
        if self.grid is not None:
            out["num_cells"] = self.grid.num_cells
            if self.collisions is not None:
                out["collisions"] = self.collisions
            if self.grid.anchors is not None:
                out["anchors"] = self.grid.anchors
            if self.grid.fine_channels:
                out |= {
                    "fine_channels": self.grid.fine_channels,
                    "fine_below": self.grid.fine_below,
                }
            if self.grid.assign != "centre":  # only then: older models' files stay as they were
                out["assign"] = self.grid.assign
            if self.grid.anchor_ratio is not None:
                out["anchor_ratio"] = self.grid.anchor_ratio
        out |= {
            "classes": self.classes,
            "feature_shape": list(self.feature_shape),
            "feature_dtype": self.feature_dtype,
            "backbone": self.backbone,
            "image_mode": self.image.mode,
            "image_size": self.image.size,
            "train": self.train,
        }
        if self.finetuned is not None:
            out["finetuned"] = self.finetuned
        return out

    @classmethod
    def from_dict(cls, raw: Any) -> ModelCard:
        """Read a stored description; CardError naming the first missing or wrong key."""
        if not isinstance(raw, dict):
            raise CardError(f"model description is not a JSON object: {raw!r:.60}")
        version = raw.get("format", 1)
        if version != CARD_FORMAT:
            raise CardError(
                f"model description format {version!r}: this pipeline reads format {CARD_FORMAT}"
            )
        return _from_format_1(raw)


def _from_format_1(raw: dict[str, Any]) -> ModelCard:
    kind = raw.get("kind")
    if kind not in KINDS:
        raise CardError(f"unknown head kind {kind!r} (known: {', '.join(KINDS)})")
    try:
        grid = None
        if kind == "multi":
            grid = GridSpec(
                int(raw["num_cells"]),
                raw.get("anchors"),
                int(raw.get("fine_channels", 0)),
                raw.get("fine_below"),
                raw.get("assign", "centre"),
                raw.get("anchor_ratio"),
            )
        return ModelCard(
            kind=kind,
            head=dict(raw["head"]),
            classes=list(raw["classes"]),
            feature_shape=[int(v) for v in raw["feature_shape"]],
            feature_dtype=raw["feature_dtype"],
            backbone=dict(raw["backbone"]),
            image=ImageSpec(raw["image_mode"], int(raw["image_size"])),
            train=dict(raw.get("train", {})),
            grid=grid,
            collisions=raw.get("collisions"),
            finetuned=raw.get("finetuned"),
        )
    except KeyError as error:
        raise CardError(f"model description lacks {error}") from None
    except (TypeError, ValueError) as error:
        raise CardError(f"model description has a wrong value ({error})") from None
