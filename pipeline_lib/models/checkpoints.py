"""Model files: a head's tensors and its model card in one safetensors file.

The card (modelcard.py) is stored as JSON in the file's metadata under "pipeline"; a fine-tuned
model also carries its backbone's weights, under names prefixed "backbone.". Nothing is unpickled
when loading: safetensors holds only tensors and strings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from pipeline_lib.base.errors import PipelineError
from pipeline_lib.base.files import atomic_file
from pipeline_lib.data.tables import Prepared
from pipeline_lib.models.headkinds import build_head
from pipeline_lib.models.modelcard import ModelCard

BACKBONE_PREFIX = "backbone."


class CheckpointError(PipelineError, ValueError):
    """A model file is missing, not ours, truncated or does not fit (the message names the file)."""


@dataclass
class Checkpoint:
    """A loaded model file: the head (in eval mode), its card and, for a fine-tuned model, the
    backbone's state dict (None otherwise: the backbone's published weights apply)."""

    head: nn.Module
    card: ModelCard
    backbone_state: dict[str, torch.Tensor] | None = None

    @property
    def classes(self) -> list[str]:
        return self.card.classes


def save_checkpoint(
    path: str | Path, head: nn.Module, card: ModelCard, backbone: nn.Module | None = None
) -> None:
    """Write the head's tensors and its card to `path`, atomically; with a (fine-tuned)
    `backbone`, its tensors too."""
    tensors = {name: t.detach().cpu().contiguous() for name, t in head.state_dict().items()}
    if backbone is not None:
        for name, t in backbone.state_dict().items():
            tensors[BACKBONE_PREFIX + name] = t.detach().cpu().contiguous()
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={"pipeline": json.dumps(card.to_dict())})


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Rebuild the head saved in `path`; CheckpointError unless it is a complete model of ours."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such model file (run the train stage first)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors model file ({error})") from None
    if "pipeline" not in metadata:
        raise CheckpointError(f"{path}: a safetensors file, but not a model of this pipeline")
    backbone = {
        name.removeprefix(BACKBONE_PREFIX): tensors.pop(name)
        for name in list(tensors)
        if name.startswith(BACKBONE_PREFIX)
    }
    try:
        card = ModelCard.from_dict(json.loads(metadata["pipeline"]))
        head = build_head(card)
        head.load_state_dict(tensors)
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(
            f"{path}: model description does not fit its tensors ({error})"
        ) from None
    return Checkpoint(head.eval(), card, backbone or None)


def check_classes(prepared: Prepared, checkpoint: Checkpoint, model: Path) -> None:
    """Refuse a model trained on other classes than the prepared tables have."""
    if prepared.classes != checkpoint.classes:
        raise PipelineError(
            f"data/prepared has classes {prepared.classes} but {model} was trained on "
            f"{checkpoint.classes}: run dvc repro"
        )
