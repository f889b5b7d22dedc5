"""Fine-tuning: the backbone's last blocks and the grid head trained together, from images.

The frozen pipeline computes features once and trains heads on them. Here every batch goes
through the backbone, so the images can be augmented, and the last `unfreeze` units of the
backbone learn too. The loop is `training.fit`'s (`ImageBatches` gives it batches of images
instead of cached features); the model is `FineTuner`, which starts from the head trained on the
frozen features.

Augmentation (torchvision.transforms.v2, which moves the boxes with the pixels): horizontal flip,
scale and shift jitter (an affine map; areas moved in from outside the image are black), colour
jitter, then boxes clamped to the image and those left smaller than a pixel dropped with their
labels. It is applied to the S x S image after the image mode, so it costs little.

The backbone's BatchNorm layers keep their ImageNet statistics (eval mode) even when their
weights train: batches of 16 images are too small to estimate them (as detectron2's FrozenBN).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from pipeline_lib.backbones import Backbone, backbone_units
from pipeline_lib.features import load_image_tensor
from pipeline_lib.geometry import decode_boxes, encode_boxes
from pipeline_lib.targets import encoded_objects, grid_targets


def augmentation(
    hflip: float = 0.5, scale_jitter: float = 0.0, translate: float = 0.0, color_jitter: float = 0.0
) -> v2.Compose:
    """Random transforms of an image with its boxes: called as `t(image, {"boxes": BoundingBoxes,
    "labels": (K,)})`. `hflip` is a probability, the image is scaled by a factor in
    [1 - scale_jitter, 1 + scale_jitter] and shifted by up to `translate` of its size, brightness,
    contrast and saturation are multiplied by factors in [1 - color_jitter, 1 + color_jitter]."""
    return v2.Compose([
        v2.RandomHorizontalFlip(hflip),
        v2.RandomAffine(degrees=0, translate=(translate, translate),
                        scale=(1 - scale_jitter, 1 + scale_jitter)),
        v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter),
        v2.ClampBoundingBoxes(),
        v2.SanitizeBoundingBoxes(min_size=1.0),
    ])  # fmt: skip


def augment(
    transform: v2.Compose, image: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Apply `transform` to a uint8 (3, H, W) image and its (K, 4) xyxy pixel boxes and (K,)
    labels -> (image, boxes float64, labels), boxes that left the image dropped."""
    height, width = image.shape[-2:]
    boxes = tv_tensors.BoundingBoxes(boxes.float(), format="XYXY", canvas_size=(height, width))
    image, target = transform(tv_tensors.Image(image), {"boxes": boxes, "labels": labels})
    boxes = target["boxes"].as_subclass(torch.Tensor).double()
    return image.as_subclass(torch.Tensor), boxes, target["labels"]


class GridImages(Dataset):
    """Images after the image mode with their grid targets, augmented when `transform` is given.

    Items are (uint8 (3, S, S) image, boxes, has_obj, labels), the targets as
    `targets.grid_targets` makes them (with `anchors`, one slot per anchor).
    """

    def __init__(self, paths: list[Path], objects: list[tuple[torch.Tensor, torch.Tensor]],
                 mode: str, size: int, num_cells: int, anchors: torch.Tensor | None = None,
                 transform: v2.Compose | None = None):  # fmt: skip
        self.paths, self.objects = paths, objects  # objects: (encoded boxes, labels) per image
        self.mode, self.size, self.num_cells = mode, size, num_cells
        self.anchors, self.transform = anchors, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        image = load_image_tensor(self.paths[index], self.mode, self.size)
        encoded, labels = self.objects[index]
        if self.transform is not None:
            boxes = decode_boxes(encoded, self.size, self.size)
            image, boxes, labels = augment(self.transform, image, boxes, labels)
            encoded = encode_boxes(boxes, self.size, self.size)
        return image, *grid_targets(encoded, labels, self.num_cells, self.anchors)[:3]


def image_objects(images, objects, image_ids: list[str], mode: str,
                  size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
    """(encoded boxes (K, 4) float64, labels (K,)) per image of `image_ids` after the image mode."""
    none = (torch.zeros(0, 4, dtype=torch.float64), torch.zeros(0, dtype=torch.int64))
    found = [none] * len(image_ids)
    for row, encoded, labels in encoded_objects(images, objects, image_ids, mode, size):
        found[row] = (encoded.double(), labels)
    return found


@dataclass
class ImageBatches:
    """`training.Dataset`'s interface over a DataLoader of GridImages, so that `training.fit`
    runs the fine-tuning too. The loader shuffles (or not) by itself: `order` is ignored."""

    loader: DataLoader

    def __len__(self) -> int:
        return len(self.loader.dataset)

    def batches(self, batch_size: int, order=None, device=None) -> Iterator:
        for images, *targets in self.loader:
            yield images.to(device), tuple(t.to(device) for t in targets)


class FineTuner(nn.Module):
    """uint8 (B, 3, S, S) images -> grid head outputs, through the backbone.

    The backbone's first units run without gradients; its last `unfreeze` units ("all": every
    one) and the head train. The modules are the backbone's and the head's own, so after training
    `backbone.module.state_dict()` and `head.state_dict()` hold the new weights.
    """

    def __init__(self, backbone: Backbone, head: nn.Module, unfreeze: int | str):
        super().__init__()
        units = backbone_units(backbone.module)
        n = len(units) if unfreeze == "all" else min(int(unfreeze), len(units))
        split = len(units) - n
        self.trainable_units = [name for name, _ in units[split:]]
        self.frozen = nn.Sequential(*(m for _, m in units[:split])).requires_grad_(False)
        self.trainable = nn.Sequential(*(m for _, m in units[split:])).requires_grad_(True)
        self.head = head
        self.register_buffer("mean", torch.tensor(backbone.mean).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(backbone.std).view(1, 3, 1, 1) * 255)

    def train(self, mode: bool = True) -> FineTuner:
        super().train(mode)
        self.frozen.eval()
        for module in self.trainable.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (images.float() - self.mean) / self.std  # as features.prepare_model normalises
        with torch.no_grad():
            x = self.frozen(x)
        return self.head(self.trainable(x))


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def grid_outputs(model: nn.Module, loader: DataLoader, device=None) -> tuple[torch.Tensor, ...]:
    """Run `model` in eval mode over a loader of GridImages (in its order); the head's outputs
    concatenated on the CPU."""
    model.eval()
    parts = [tuple(t.cpu() for t in model(images.to(device))) for images, *_ in loader]
    return tuple(torch.cat(p) for p in zip(*parts, strict=True))
