"""Image files -> pixels, for extraction, fine-tuning and predict.

`load_rgb` decodes a file fully as RGB with PIL's checks (a file named for another format, a
decompression bomb, truncation: an `ImageError` naming the file), large JPEGs at a lower scale
under `shrink`; `load_image_tensor` applies the image mode on uint8 tensors; `ImageFolder` is the
Dataset of decoded images the extraction loop reads (an undecodable image is an item with its
error, so `data.on_error: skip` can leave it out).
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as F

from pipeline_lib.base.errors import PipelineError
from pipeline_lib.base.params import ParamsError
from pipeline_lib.boxes.geometry import transform_pixels

_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}


class ImageError(PipelineError, ValueError):
    """An image cannot be decoded (the message names the file)."""


def load_rgb(path: Path, at_least: int | None = None) -> Image.Image:
    """Decode an image fully as RGB, or raise `ImageError` naming the file.

    Greyscale, palette, CMYK and alpha images are converted to RGB. A file whose content does not
    match its extension (a PNG named .jpg) and PIL's decompression-bomb guard are refused. With
    `at_least`, a JPEG at least twice that size each way is decoded at 1/2, 1/4 or 1/8 of its
    size, never below `at_least` pixels each way (DCT scaling, PIL's `draft`): a 2000 x 1500
    photo for 224 x 224 in 5 ms instead of 13 (benchmarks/extract.py); smaller images and other
    formats are decoded as they are.
    """
    try:
        with Image.open(path) as image:
            expected = _FORMATS.get(path.suffix.lower())
            found = "JPEG" if image.format == "MPO" else image.format  # multi-picture JPEG
            if expected and found != expected:
                raise ImageError(f"{path}: image: a {image.format} file named {path.suffix}")
            if at_least:
                image.draft(None, (at_least, at_least))  # no-op unless a JPEG >= 2x each way
            return image.convert("RGB")  # convert() decodes everything: truncation shows here
    except FileNotFoundError:
        raise ImageError(f"{path}: image: missing (was it deleted since prepare ran?)") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError) as exc:
        raise ImageError(f"{path}: image: cannot decode ({exc})") from None


def load_image_tensor(path: Path, mode: str, size: int) -> torch.Tensor:
    """An image file after the image mode as a uint8 (3, S, S) tensor (`load_rgb`'s errors).

    PIL decodes (under `shrink`, large JPEGs at a lower scale: `load_rgb`'s `at_least`),
    torchvision's uint8 kernel resizes (`geometry.transform_pixels`): on VOC photos at 224 that
    is ~1.7 ms an image where PIL's own resize made it ~2.4 ms (benchmarks/extract.py).
    torchvision's `decode_jpeg` gives the same pixels as PIL (all 765 VOC photos compared) about
    0.3 ms sooner, but is deprecated since torchvision 0.29, and skips PIL's checks.
    """
    image = load_rgb(path, at_least=size if mode == "shrink" else None)
    return transform_pixels(F.pil_to_tensor(image), mode, size).contiguous()


def check_stackable(mode: str) -> None:
    """Extraction needs one size for all images: refuse image.mode none."""
    if mode == "none":
        raise ParamsError(
            "image.mode: none keeps every image's own size, so features cannot be stacked into "
            "one tensor; use shrink or crop for extraction"
        )


class ImageFolder(Dataset):
    """Items are (index, uint8 (3, S, S) tensor or None, error message or None); `flipped`: the
    S x S image flipped left to right."""

    def __init__(self, paths: list[Path], mode: str, size: int, flipped: bool = False):
        check_stackable(mode)
        self.paths, self.mode, self.size, self.flipped = paths, mode, size, flipped

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            pixels = load_image_tensor(self.paths[index], self.mode, self.size)
        except ImageError as exc:
            return index, None, str(exc)
        return index, pixels.flip(-1) if self.flipped else pixels, None


def collate_decoded(items):
    good = [item for item in items if item[1] is not None]
    bad = [(index, error) for index, _, error in items if error is not None]
    batch = torch.stack([tensor for _, tensor, _ in good]) if good else None
    return [index for index, _, _ in good], batch, bad
