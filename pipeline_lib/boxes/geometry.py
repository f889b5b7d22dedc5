"""Box geometry under the image modes, in the style of torchvision.ops: pure functions on tensors.

Boxes are (N, 4) float tensors in (xmin, ymin, xmax, ymax) pixel coordinates of the image they
belong to, unless a docstring says "encoded": then they are (cx, cy, w, h), each a fraction of the
image's width or height (what the heads predict). Image sizes are given as (width, height) in
pixels. VOC coordinates are used as written in the XML (as the original lab does).

Image modes (params `image.mode`, `image.size` = S):
- `none`:   the image as it is.
- `shrink`: resized to S x S (aspect ratio not kept).
- `crop`:   the centre S x S window, without resizing; an image smaller than S is padded with black.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.ops import box_convert, clip_boxes_to_image
from torchvision.transforms.v2 import functional as F

IMAGE_MODES = ("none", "shrink", "crop")


@dataclass(frozen=True)
class ImageSpec:
    """How images are brought to the backbone (params `image.mode` and `image.size`)."""

    mode: str
    size: int

    def __post_init__(self) -> None:
        _check_mode(self.mode)


def crop_window(width: int, height: int, size: int) -> tuple[int, int]:
    """(left, top) of the centre `size` x `size` window; negative when the image is smaller.

    Rounds like torchvision's `center_crop`, so image and boxes use the same offset.
    """
    return int(round((width - size) / 2.0)), int(round((height - size) / 2.0))


def output_size(width: int, height: int, mode: str, size: int) -> tuple[int, int]:
    """(width, height) of an image of `width` x `height` after the image mode."""
    _check_mode(mode)
    return (width, height) if mode == "none" else (size, size)


def transform_pixels(pixels: torch.Tensor, mode: str, size: int) -> torch.Tensor:
    """Apply the image mode to a uint8 (3, H, W) image tensor: (3, S, S) (`none`: unchanged).

    `shrink` is bilinear with antialiasing, torchvision's uint8 kernel (PIL's BILINEAR filter to
    within one level on under 1 % of the pixels, and 5x faster than this machine's PIL); `crop`
    pads with black outside the image.
    """
    _check_mode(mode)
    if mode == "none":
        return pixels
    if mode == "shrink":
        return F.resize(pixels, [size, size], antialias=True)
    left, top = crop_window(pixels.shape[-1], pixels.shape[-2], size)
    return F.crop(pixels, top, left, size, size)  # pads with zeros where the window is outside


def transform_image(image: Image.Image, mode: str, size: int) -> Image.Image:
    """Apply the image mode to an RGB PIL image (for figures): `transform_pixels`'s pixels."""
    if mode == "none":
        return image
    return F.to_pil_image(transform_pixels(F.pil_to_tensor(image), mode, size))


def transform_boxes(
    boxes: torch.Tensor, width: int, height: int, mode: str, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Map (N, 4) xyxy boxes of a `width` x `height` image through the image mode.

    Returns the boxes in the output image's pixels and a (N,) bool mask of the boxes kept: `crop`
    clips boxes to the window and drops those left empty; the other modes keep all boxes.
    """
    _check_mode(mode)
    boxes = boxes.to(torch.float64)
    kept = torch.ones(len(boxes), dtype=torch.bool, device=boxes.device)
    if mode == "none":
        return boxes, kept
    if mode == "shrink":
        scale = boxes.new_tensor([size / width, size / height] * 2)  # float64, as the boxes
        return boxes * scale, kept
    left, top = crop_window(width, height, size)
    shifted = boxes - boxes.new_tensor([left, top, left, top])
    clipped = clip_boxes_to_image(shifted, (size, size))
    keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    return clipped[keep], keep


def untransform_boxes(
    boxes: torch.Tensor, width: int, height: int, mode: str, size: int
) -> torch.Tensor:
    """Map (N, 4) xyxy boxes of the output image back to the original `width` x `height` image.

    The inverse of `transform_boxes` for the boxes it keeps. Boxes are clipped to the original
    image under every mode (a predicted box may overhang the network's input; under `crop` it may
    reach past the window onto the rest of the photo, and keeps that part).
    """
    _check_mode(mode)
    boxes = boxes.to(torch.float64)
    if mode == "none":
        return clip_boxes_to_image(boxes, (height, width))
    if mode == "shrink":
        scale = boxes.new_tensor([width / size, height / size] * 2)
        return clip_boxes_to_image(boxes * scale, (height, width))
    left, top = crop_window(width, height, size)
    shifted = boxes + boxes.new_tensor([left, top, left, top])
    return clip_boxes_to_image(shifted, (height, width))


def encode_boxes(boxes: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """(N, 4) xyxy pixel boxes of a `width` x `height` image -> (N, 4) encoded (cx, cy, w, h)."""
    return box_convert(boxes, "xyxy", "cxcywh") / boxes.new_tensor([width, height] * 2)


def decode_boxes(encoded: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """(N, 4) encoded (cx, cy, w, h) -> (N, 4) xyxy pixel boxes of a `width` x `height` image."""
    return box_convert(encoded * encoded.new_tensor([width, height] * 2), "cxcywh", "xyxy")


def pixel_fraction(width: int, mode: str, size: int) -> float:
    """The width of one pixel of a `width`-wide image as a fraction of its output image's width:
    1 / width (`none`, `shrink`), 1 / size (`crop`, which keeps the pixels)."""
    _check_mode(mode)
    return 1 / size if mode == "crop" else 1 / width


def mirror_encoded(encoded: torch.Tensor, pixel: float = 0.0) -> torch.Tensor:
    """(N, 4) encoded (cx, cy, w, h) boxes -> the same boxes in the output image flipped left to
    right: cx -> 1 + pixel - cx. `pixel` is 0 for continuous coordinates (COCO: x -> W - x); for
    1-based inclusive pixel indices (VOC, the devkit: column x of a W-wide image is column
    W + 1 - x once flipped) it is one pixel as a fraction of the width (`pixel_fraction`).
    Its own inverse."""
    return encoded * encoded.new_tensor([-1, 1, 1, 1]) + encoded.new_tensor([1 + pixel, 0, 0, 0])


def encoded_to_image(
    encoded: torch.Tensor, width: int, height: int, mode: str, size: int
) -> torch.Tensor:
    """(N, 4) encoded boxes of the output image -> xyxy pixels of the original `width` x `height`
    image it came from through `mode` / `size`."""
    out_width, out_height = output_size(width, height, mode, size)
    boxes = decode_boxes(encoded.double(), out_width, out_height)
    return untransform_boxes(boxes, width, height, mode, size)


def largest_box(encoded: torch.Tensor) -> int:
    """Index of the box with the largest w * h among (N, 4) encoded boxes (the first on a tie)."""
    if len(encoded) == 0:
        raise ValueError("largest_box: no boxes")
    return int(torch.argmax(encoded[:, 2] * encoded[:, 3]))


def paired_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N,) IoU of a[i] with b[i] for (N, 4) xyxy boxes.

    torchvision's `box_iou` computes all N x M pairs; this is its diagonal without the N x N matrix.
    """
    top_left = torch.maximum(a[:, :2], b[:, :2])
    bottom_right = torch.minimum(a[:, 2:], b[:, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=1)
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    union = area_a + area_b - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), 0.0)


def _check_mode(mode: str) -> None:
    if mode not in IMAGE_MODES:
        raise ValueError(f"unknown image mode {mode!r}; allowed: {', '.join(IMAGE_MODES)}")
