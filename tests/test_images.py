"""Image files to pixels (features/images.py): JPEGs decoded at a lower scale when much larger than
the target, the Dataset extraction reads (flipped items, errors carried with the index)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from pipeline_lib.features.images import ImageFolder, load_image_tensor

REPO = Path(__file__).resolve().parents[1]


def photo(path: Path, width: int, height: int) -> Path:
    """A JPEG with smooth gradients and fine detail (as a photo has both)."""
    y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    torch.manual_seed(2)
    pixels = torch.stack([x * 200, y * 200, (x + y) * 100]) + torch.rand(3, height, width) * 50
    F.to_pil_image(pixels.clamp(0, 255).to(torch.uint8)).save(path, quality=90)
    return path


def full_decode(path: Path, draft: tuple[int, int] | None = None) -> torch.Tensor:
    with Image.open(path) as image:
        if draft:
            image.draft(None, draft)
        return F.pil_to_tensor(image.convert("RGB"))


def test_large_jpegs_are_decoded_at_a_lower_scale_under_shrink(tmp_path):
    """A JPEG at least twice the target size each way is decoded by DCT scaling (PIL's draft:
    1000 x 800 for 224 -> 1/2 scale, 500 x 400), then resized; a smaller one, and any image under
    crop, are decoded fully."""
    big, small = photo(tmp_path / "big.jpg", 1000, 800), photo(tmp_path / "small.jpg", 500, 375)
    drafted = full_decode(big, (224, 224))
    assert drafted.shape == (3, 400, 500)  # PIL scaled by 1/2: 800 // 224 = 3 -> 2
    got = load_image_tensor(big, "shrink", 224)
    assert torch.equal(got, F.resize(drafted, [224, 224], antialias=True))
    full = F.resize(full_decode(big), [224, 224], antialias=True)
    apart = (got.float() - full.float()).abs()
    assert 0 < apart.mean() < 2  # a lower-scale decode, but the same picture
    for path, mode, expected in (
        (small, "shrink", F.resize(full_decode(small), [224, 224], antialias=True)),  # < 2x
        (big, "crop", F.center_crop(full_decode(big), [224, 224])),  # crop keeps the pixels
    ):
        assert torch.equal(load_image_tensor(path, mode, 224), expected)


def test_image_folder_items_flip_left_to_right_and_carry_errors(tmp_path):
    pixels = torch.arange(3 * 4 * 6, dtype=torch.uint8).view(3, 4, 6) * 3
    F.to_pil_image(pixels).save(tmp_path / "a.png")
    (tmp_path / "bad.png").write_text("not an image")
    paths = [tmp_path / "a.png", tmp_path / "bad.png"]
    plain, flipped = ImageFolder(paths, "crop", 4), ImageFolder(paths, "crop", 4, flipped=True)
    index, image, error = plain[0]
    assert index == 0 and error is None and torch.equal(image, pixels[:, :, 1:5])
    index, mirrored, error = flipped[0]
    assert torch.equal(mirrored, pixels[:, :, 1:5].flip(-1)) and error is None
    index, image, error = plain[1]
    assert (index, image) == (1, None) and error.startswith(f"{tmp_path / 'bad.png'}: image: ")
