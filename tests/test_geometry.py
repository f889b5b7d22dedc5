"""Image modes on boxes and images, against hand-computed values."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from pipeline_lib.boxes.geometry import (
    crop_window,
    encoded_to_image,
    output_size,
    transform_boxes,
    transform_image,
    transform_pixels,
    untransform_boxes,
)

BOXES = torch.tensor([[100.0, 100.0, 300.0, 200.0], [10.0, 10.0, 60.0, 50.0]])


def test_none_keeps_everything():
    boxes, keep = transform_boxes(BOXES, 500, 375, "none", 224)
    assert torch.equal(boxes, BOXES.double()) and keep.all()
    assert output_size(500, 375, "none", 224) == (500, 375)


def test_mode_none_leaves_the_pixels_as_they_are():
    pixels = torch.randint(0, 256, (3, 30, 50), dtype=torch.uint8)
    assert transform_pixels(pixels, "none", 16) is pixels  # whatever the size


def test_the_kept_mask_lies_on_the_boxes_device():
    for mode in ("none", "shrink"):
        boxes, kept = transform_boxes(BOXES.to("meta"), 500, 375, mode, 224)
        assert boxes.device.type == kept.device.type == "meta", mode


def test_shrink_scales_each_axis():
    boxes, keep = transform_boxes(BOXES, 500, 375, "shrink", 224)
    # 224/500 = 0.448 and 224/375 = 0.597333...
    expected = torch.tensor(
        [[44.8, 59.7333333, 134.4, 119.4666667], [4.48, 5.9733333, 26.88, 29.8666667]]
    )
    assert torch.allclose(boxes, expected.double(), atol=1e-6) and keep.all()


def test_crop_shifts_clips_and_drops():
    # 500x375 -> centre 224 window starts at ((500-224)/2, (375-224)/2) = (138, 75.5 -> 76)
    assert crop_window(500, 375, 224) == (138, 76)
    boxes, keep = transform_boxes(BOXES, 500, 375, "crop", 224)
    assert keep.tolist() == [True, False]  # the second box lies left of the window
    assert boxes.tolist() == [[0.0, 24.0, 162.0, 124.0]]


def test_crop_of_a_small_image_pads():
    assert crop_window(100, 300, 224) == (-62, 38)
    image = transform_image(Image.new("RGB", (100, 300), (255, 255, 255)), "crop", 224)
    assert image.size == (224, 224)
    assert image.getpixel((0, 100)) == (0, 0, 0) and image.getpixel((100, 100)) == (255, 255, 255)
    boxes, _ = transform_boxes(torch.tensor([[0.0, 38.0, 100.0, 100.0]]), 100, 300, "crop", 224)
    assert boxes.tolist() == [[62.0, 0.0, 162.0, 62.0]]


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="allowed: none, shrink, crop"):
        transform_boxes(BOXES, 500, 375, "zoom", 224)


def test_float32_boxes_are_mapped_in_float64_both_ways():
    # A float32 scale (224 / 333 = 0.67267267... rounded to 24 bits) would move these boxes by
    # about 1e-5 pixels: the mapping is float64 throughout, whatever the input's dtype.
    boxes = torch.tensor([[1.0, 2.0, 333.0, 250.0]])  # float32 in
    shrunk, _ = transform_boxes(boxes, 333, 250, "shrink", 224)
    assert shrunk.dtype == torch.float64
    exact = [224 / 333, 2 * 224 / 250, 224.0, 224.0]
    assert shrunk[0].tolist() == pytest.approx(exact, rel=1e-14, abs=1e-12)
    back = untransform_boxes(shrunk.float(), 333, 250, "shrink", 224)
    assert back.dtype == torch.float64
    assert back[0].tolist() == pytest.approx([1.0, 2.0, 333.0, 250.0], rel=1e-6)
    back = untransform_boxes(
        torch.tensor([[224 / 333, 0.5, 100.0, 224.0]]), 333, 250, "shrink", 224
    )
    assert back[0, 0].item() == pytest.approx(float(torch.tensor(224 / 333)) * 333 / 224, rel=1e-15)


def test_images_under_each_mode():
    image = Image.effect_noise((40, 30), 60).convert("RGB")
    assert transform_image(image, "none", 16) is image
    shrunk = transform_image(image, "shrink", 16)
    assert shrunk.size == (16, 16)  # bilinear, as the features were computed

    def levels_apart(other: Image.Image) -> torch.Tensor:
        return (F.pil_to_tensor(shrunk).int() - F.pil_to_tensor(other).int()).abs()

    # PIL's antialiased bilinear filter, up to the rounding of torchvision's uint8 kernel
    bilinear = levels_apart(image.resize((16, 16), Image.Resampling.BILINEAR))
    assert bilinear.max() <= 1 and (bilinear > 0).float().mean() < 0.1
    bicubic = levels_apart(image.resize((16, 16), Image.Resampling.BICUBIC))
    assert bicubic.max() > 1 and (bicubic > 0).float().mean() > 0.5
    assert transform_image(image, "crop", 16).size == (16, 16)


@pytest.mark.parametrize(
    ("mode", "size", "width", "height", "encoded", "expected"),
    [
        # none, 80 x 60: cx 8 w 32 -> x -8..24; cy 54 h 24 -> y 42..66; clipped to the photo
        ("none", 64, 80, 60, [0.1, 0.9, 0.4, 0.4], [0.0, 42.0, 24.0, 60.0]),
        # shrink 200 x 100 to 50: x 35..55, y 20..30 of the input, times (4, 2): x 140..220
        ("shrink", 50, 200, 100, [0.9, 0.5, 0.4, 0.2], [140.0, 40.0, 200.0, 60.0]),
        # crop 100 x 40 at 64: window (18, -12); y 32 +- 48 -> -16..80, shifted -28..68 -> 0..40;
        # x 3.2 +- 9.6 -> -6.4..12.8, shifted 11.6..30.8 (on the photo: kept)
        ("crop", 64, 100, 40, [0.05, 0.5, 0.3, 1.5], [11.6, 0.0, 30.8, 40.0]),
        # crop 30 x 20 at 64 (padded): window (-17, -22); x 57.6 +- 12.8 -> 27.8..53.4 -> 27.8..30
        ("crop", 64, 30, 20, [0.9, 0.5, 0.4, 0.2], [27.8, 3.6, 30.0, 16.4]),
    ],
)
def test_decoded_boxes_come_back_in_original_pixels_clamped_to_the_photo(
    mode, size, width, height, encoded, expected
):
    """Each image mode's decoding of a predicted box that overhangs the network's input: back to
    the original photo's pixels (hand-computed), clipped to the photo."""
    back = encoded_to_image(torch.tensor([encoded], dtype=torch.float64), width, height, mode, size)
    assert back.dtype == torch.float64
    assert back[0].tolist() == pytest.approx(expected, abs=1e-9)
