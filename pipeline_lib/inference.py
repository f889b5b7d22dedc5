"""A trained model file applied to anyone's images: backbone, head and decoding in one object.

The checkpoint describes everything needed (see `stages/train.py`): the backbone (name, layer,
weights, normalisation), the image mode and size, the dtype the cached training features were
stored in and the classes; a fine-tuned model (`stages/finetune.py`) also holds the backbone's
weights. So a model file alone is enough, without params.yaml or the dataset.

Images go through exactly what `extract` + `evaluate` do: image mode, backbone, features rounded to
the stored dtype, head, decoding to the original pixels. Only the decoding of files differs:
`open_photo` applies the EXIF orientation (a phone photo is shown as it was taken), which VOC's
training images never carry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline_lib.backbones import load_backbone
from pipeline_lib.detection import Detections, grid_detections, single_detections
from pipeline_lib.features import STORE_DTYPES, ImageError, pick_device, prepare_model
from pipeline_lib.geometry import encoded_to_image, transform_image
from pipeline_lib.heads import Checkpoint, CheckpointError, load_checkpoint
from pipeline_lib.training import predict


@dataclass
class Detector:
    """A loaded model: `forward` maps uint8 (B, 3, S, S) images on `device` to float features."""

    checkpoint: Checkpoint
    forward: Callable[[torch.Tensor], torch.Tensor]
    device: torch.device
    feature_dtype: torch.dtype

    @property
    def info(self) -> dict:
        return self.checkpoint.info

    @property
    def classes(self) -> list[str]:
        return self.checkpoint.classes


def load_detector(model_path: str | Path, device: str = "auto") -> Detector:
    """Load a model file and the backbone it was trained on (once); CheckpointError if the file
    is not a complete model of this pipeline or its features cannot be reproduced."""
    checkpoint = load_checkpoint(model_path)
    info = checkpoint.info
    try:
        spec, mode = info["backbone"], info["image_mode"]
        dtype = STORE_DTYPES[info["feature_dtype"]]
    except KeyError as error:
        raise CheckpointError(f"{model_path}: model description lacks {error}") from None
    if spec["weights"] != "imagenet":
        raise CheckpointError(
            f"{model_path}: trained on features of a randomly initialised {spec['name']}, which "
            "cannot be rebuilt here; retrain with backbone.weights: imagenet"
        )
    if mode == "none":
        raise CheckpointError(f"{model_path}: image mode 'none' cannot batch images")
    backbone = load_backbone(spec["name"], spec["layer"], spec["weights"], spec.get("fine_layer"))
    if checkpoint.backbone_state is not None:  # a fine-tuned model (the finetune stage)
        try:
            backbone.module.load_state_dict(checkpoint.backbone_state)
        except RuntimeError as error:
            raise CheckpointError(f"{model_path}: backbone weights do not fit {spec['name']} "
                                  f"({str(error).splitlines()[0]})") from None  # fmt: skip
    if [list(backbone.mean), list(backbone.std)] != [spec["mean"], spec["std"]]:
        raise CheckpointError(
            f"{model_path}: trained with normalisation mean {spec['mean']} std {spec['std']}, "
            f"but {spec['name']} here uses {list(backbone.mean)} / {list(backbone.std)}"
        )
    torch_device = pick_device(device)
    checkpoint.head.to(torch_device)
    return Detector(checkpoint, prepare_model(backbone, torch_device), torch_device, dtype)


def open_photo(path: Path) -> Image.Image:
    """Decode an image file of any format PIL reads as RGB, upright by its EXIF orientation
    (multi-frame files: the first frame), or raise `ImageError` naming the file."""
    try:
        with Image.open(path) as image:
            return ImageOps.exif_transpose(image).convert("RGB")  # convert() decodes it all
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: a folder, not an image") from None
    except UnidentifiedImageError:
        what = "an empty file" if path.stat().st_size == 0 else "PIL cannot identify it"
        raise ImageError(f"{path}: not an image ({what})") from None
    except (Image.DecompressionBombError, OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"{path}: cannot decode ({error})") from None


def detect(
    detector: Detector,
    images: list[Image.Image],
    score_threshold: float = 0.2,
    nms_iou: float | None = 0.5,
    max_detections: int = 100,
) -> list[Detections]:
    """RGB images of any sizes (one batch) -> their detections, boxes in each image's pixels.

    The grid head keeps cells scoring `score_threshold` or more, then NMS at `nms_iou` (None: no
    NMS); the single-object head gives one box per image whatever its score.
    """
    info = detector.info
    mode, size = info["image_mode"], info["image_size"]
    batch = torch.stack([
        torch.from_numpy(np.array(transform_image(image, mode, size), dtype=np.uint8))
        for image in images
    ]).permute(0, 3, 1, 2)  # fmt: skip
    # Rounded to the stored dtype: the head was trained on (and evaluate reads) those values.
    features = detector.forward(batch.to(detector.device)).to(detector.feature_dtype)
    with torch.inference_mode():
        outputs = [t.cpu() for t in predict(detector.checkpoint.head, features)]
    sizes = [image.size for image in images]
    if info["kind"] == "single":
        return single_detections(*outputs, sizes, mode, size)
    return grid_detections(outputs[0::2], outputs[1::2], sizes, mode, size, score_threshold,
                           nms_iou, max_detections)  # fmt: skip


def cell_rectangles(info: dict, width: int, height: int) -> torch.Tensor:
    """The grid head's S x S cells as (S*S, 4) xyxy boxes in a `width` x `height` image's pixels
    (row-major), for drawing: with crop they cover only the centre window."""
    s = info["num_cells"]
    i, j = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    centres = torch.stack([(j.flatten() + 0.5) / s, (i.flatten() + 0.5) / s], dim=1)
    encoded = torch.cat([centres, torch.full_like(centres, 1 / s)], dim=1)
    return encoded_to_image(encoded, width, height, info["image_mode"], info["image_size"])
