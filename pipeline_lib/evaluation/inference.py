"""A trained model file applied to anyone's images: backbone, head and decoding in one object.

The checkpoint describes everything needed (see `stages/train.py`): the backbone (name, layer,
weights, normalisation), the image mode and size, the dtype the cached training features were
stored in and the classes; a fine-tuned model (`stages/finetune.py`) also holds the backbone's
weights. So a model file alone is enough, without params.yaml or the dataset.

Images go through exactly what `extract` + `evaluate` do: image mode, backbone (in the precision
the features were computed in), features rounded to the stored dtype, head, decoding to the
original pixels. Only the decoding of files differs: `open_photo` applies the EXIF orientation (a
phone photo is shown as it was taken), which VOC's training images never carry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms.v2 import functional as F

from pipeline_lib.boxes.detection import Detections, Filtering
from pipeline_lib.boxes.geometry import ImageSpec, encoded_to_image, transform_pixels
from pipeline_lib.boxes.gridcoding import cell_fractions
from pipeline_lib.features.backbones import load_backbone
from pipeline_lib.features.devices import pick_device, prepare_model
from pipeline_lib.features.featurefiles import STORE_DTYPES
from pipeline_lib.features.images import ImageError
from pipeline_lib.models.checkpoints import Checkpoint, CheckpointError, load_checkpoint
from pipeline_lib.models.modelcard import ModelCard
from pipeline_lib.reporting.plots import annotate
from pipeline_lib.training.loop import predict


@dataclass
class Detector:
    """A loaded model: `forward` maps uint8 (B, 3, S, S) images on `device` to float features."""

    checkpoint: Checkpoint
    forward: Callable[[torch.Tensor], torch.Tensor]
    device: torch.device
    feature_dtype: torch.dtype

    @property
    def card(self) -> ModelCard:
        return self.checkpoint.card

    @property
    def classes(self) -> list[str]:
        return self.checkpoint.classes


def load_detector(model_path: str | Path, device: str = "auto") -> Detector:
    """Load a model file and the backbone it was trained on (once); CheckpointError if the file
    is not a complete model of this pipeline or its features cannot be reproduced."""
    checkpoint = load_checkpoint(model_path)
    card = checkpoint.card
    spec, mode = card.backbone, card.image.mode
    try:
        dtype = STORE_DTYPES[card.feature_dtype]
    except KeyError as error:
        raise CheckpointError(f"{model_path}: unknown feature dtype {error}") from None
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
            first = str(error).splitlines()[0]
            raise CheckpointError(
                f"{model_path}: backbone weights do not fit {spec['name']} ({first})"
            ) from None
    if [list(backbone.mean), list(backbone.std)] != [spec["mean"], spec["std"]]:
        raise CheckpointError(
            f"{model_path}: trained with normalisation mean {spec['mean']} std {spec['std']}, "
            f"but {spec['name']} here uses {list(backbone.mean)} / {list(backbone.std)}"
        )
    torch_device = pick_device(device, "--device")
    checkpoint.head.to(torch_device)
    # As extract ran it (models from before backbone.precision existed were made in float32).
    precision = spec.get("precision", "float32")
    forward = prepare_model(backbone, torch_device, precision=precision)
    return Detector(checkpoint, forward, torch_device, dtype)


def open_photo(path: Path, at_least: int | None = None) -> Image.Image:
    """Decode an image file of any format PIL reads as RGB, upright by its EXIF orientation
    (multi-frame files: the first frame), or raise `ImageError` naming the file. `at_least`: a
    JPEG may be decoded at a lower scale, as `images.load_rgb` does."""
    try:
        with Image.open(path) as image:
            if at_least:
                image.draft(None, (at_least, at_least))
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


@dataclass
class Photo:
    """A photo to detect in: `image` (upright RGB, full size) is drawn, `pixels` (uint8 (3, S, S))
    go to the backbone, decoded as `extract` decodes."""

    path: Path
    image: Image.Image
    pixels: torch.Tensor


def read_photo(path: Path, spec: ImageSpec) -> Photo:
    """Open a photo (`open_photo`'s errors) and make its backbone input under `spec`."""
    image = source = open_photo(path)
    if spec.mode == "shrink" and min(image.size) >= 2 * spec.size:
        source = open_photo(path, at_least=spec.size)  # as images.load_image_tensor decodes
    return Photo(path, image, transform_pixels(F.pil_to_tensor(source), spec.mode, spec.size))


def detect(detector: Detector, photos: list[Photo], keep: Filtering) -> list[Detections]:
    """Photos of any sizes (one batch) -> their detections, boxes in each image's pixels.

    The grid head keeps the cells `keep` lets through; the single-object head gives one box per
    image whatever its score.
    """
    card = detector.card
    batch = torch.stack([photo.pixels for photo in photos])
    # Rounded to the stored dtype: the head was trained on (and evaluate reads) those values.
    features = detector.forward(batch.to(detector.device)).to(detector.feature_dtype)
    with torch.inference_mode():
        outputs = [t.cpu() for t in predict(detector.checkpoint.head, features)]
    sizes = [photo.image.size for photo in photos]
    return detector.checkpoint.head.detections(outputs, sizes, card.image, keep)


def cell_rectangles(card: ModelCard, width: int, height: int) -> torch.Tensor:
    """The grid head's S x S cells as (S*S, 4) xyxy boxes in a `width` x `height` image's pixels
    (row-major), for drawing: with crop they cover only the centre window."""
    fractions = cell_fractions(card.grid.num_cells)
    return encoded_to_image(fractions, width, height, card.image.mode, card.image.size)


TABLE_COLUMNS = ["image", "class", "score", "xmin", "ymin", "xmax", "ymax"]


def image_suffixes() -> set[str]:
    """The file suffixes of every format PIL can open here (.jpg, .png, .webp, .bmp, .tif, ...),
    lower case."""
    Image.init()  # registers every plugin PIL has
    return {ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


@dataclass
class Inputs:
    """What `collect_images` made of the arguments."""

    paths: list[Path]  # files as given, then each folder's image files (sorted)
    problems: list[str]  # arguments that are neither a file nor a folder of images: errors
    skipped: list[str]  # files in a folder with no image suffix: notes, with the reason


def collect_images(arguments: list[Path]) -> Inputs:
    """Files as given, folders expanded to their files of a format PIL reads (`image_suffixes`);
    the folders' other files are skipped and listed, hidden ones (.name) silently."""
    suffixes = image_suffixes()
    found = Inputs([], [], [])
    for argument in arguments:
        if argument.is_dir():
            files = sorted(p for p in argument.iterdir() if p.is_file())
            images = [p for p in files if p.suffix.lower() in suffixes]
            for other in files:
                if other not in images and not other.name.startswith("."):
                    found.skipped.append(
                        f"{other}: not a format PIL reads ({other.suffix or 'no suffix'})"
                    )
            if not images:
                found.problems.append(f"{argument}: no image files in this folder")
            found.paths.extend(images)
        elif argument.exists():
            found.paths.append(argument)
        else:
            found.problems.append(f"{argument}: no such file or folder")
    return found


def table_rows(path: Path, detections: Detections, classes: list[str]) -> list[dict]:
    """One row per detection (TABLE_COLUMNS): the image path as given, class, score, box."""
    boxes = detections.boxes.tolist()
    found = zip(detections.labels.tolist(), detections.scores.tolist(), boxes, strict=True)
    return [
        {"image": str(path), "class": classes[k], "score": round(s, 5)}
        | {c: round(v, 2) for c, v in zip(TABLE_COLUMNS[3:], box, strict=True)}
        for k, s, box in found
    ]


def draw(detector: Detector, image: Image.Image, detections: Detections, show_grid: bool):
    """The photo at full size with its detections (and the grid head's cells)."""
    scored = zip(detections.labels.tolist(), detections.scores.tolist(), strict=True)
    texts = [f"{detector.classes[k]} {s:.2f}" for k, s in scored]
    cells = cell_rectangles(detector.card, *image.size) if show_grid else None
    return annotate(image, detections.boxes, texts, detections.labels.tolist(), cells)


def unique_name(path: Path, taken: set[str]) -> str:
    """<stem>.png, or <stem>_2.png, ... when two inputs share a stem."""
    name, n = f"{path.stem}.png", 1
    while name in taken:
        n += 1
        name = f"{path.stem}_{n}.png"
    taken.add(name)
    return name
