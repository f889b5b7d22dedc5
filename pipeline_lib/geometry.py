"""Box geometry under the image modes, in the style of torchvision.ops: pure functions on tensors.

Boxes are (N, 4) float tensors in (xmin, ymin, xmax, ymax) pixel coordinates of the image they
belong to. Image sizes are given as (width, height) in pixels.

Image modes (params `image.mode`, `image.size` = S):
- `none`:   the image as it is.
- `shrink`: resized to S x S (aspect ratio not kept).
- `crop`:   the centre S x S window, without resizing; an image smaller than S is padded with black.
"""

from __future__ import annotations

import torch
from PIL import Image
from torchvision.ops import clip_boxes_to_image

IMAGE_MODES = ("none", "shrink", "crop")


def crop_window(width: int, height: int, size: int) -> tuple[int, int]:
    """(left, top) of the centre `size` x `size` window; negative when the image is smaller.

    Rounds like torchvision's `center_crop`, so image and boxes use the same offset.
    """
    return int(round((width - size) / 2.0)), int(round((height - size) / 2.0))


def output_size(width: int, height: int, mode: str, size: int) -> tuple[int, int]:
    """(width, height) of an image of `width` x `height` after the image mode."""
    _check_mode(mode)
    return (width, height) if mode == "none" else (size, size)


def transform_image(image: Image.Image, mode: str, size: int) -> Image.Image:
    """Apply the image mode to a PIL image."""
    _check_mode(mode)
    if mode == "none":
        return image
    if mode == "shrink":
        return image.resize((size, size), Image.Resampling.BILINEAR)
    left, top = crop_window(image.width, image.height, size)
    return image.crop((left, top, left + size, top + size))  # PIL pads outside with black


def transform_boxes(
    boxes: torch.Tensor, width: int, height: int, mode: str, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Map (N, 4) xyxy boxes of a `width` x `height` image through the image mode.

    Returns the boxes in the output image's pixels and a (N,) bool mask of the boxes kept: `crop`
    clips boxes to the window and drops those left empty; the other modes keep all boxes.
    """
    _check_mode(mode)
    boxes = boxes.to(torch.float64)
    if mode == "none":
        return boxes, torch.ones(len(boxes), dtype=torch.bool)
    if mode == "shrink":
        scale = torch.tensor([size / width, size / height, size / width, size / height])
        return boxes * scale.to(boxes.dtype), torch.ones(len(boxes), dtype=torch.bool)
    left, top = crop_window(width, height, size)
    shifted = boxes - torch.tensor([left, top, left, top], dtype=boxes.dtype)
    clipped = clip_boxes_to_image(shifted, (size, size))
    keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    return clipped[keep], keep


def _check_mode(mode: str) -> None:
    if mode not in IMAGE_MODES:
        raise ValueError(f"unknown image mode {mode!r}; allowed: {', '.join(IMAGE_MODES)}")
