"""Property-based tests (hypothesis) of the box geometry: random boxes, image sizes, modes, grids.

The expected values are the definitions themselves (a box inside the image, its clip to the crop
window), not outputs of the code under test.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.ops import box_iou

from pipeline_lib.boxes.geometry import (
    crop_window,
    encode_boxes,
    encoded_to_image,
    output_size,
    paired_iou,
    transform_boxes,
)

# The same examples on every run and machine (no example database): a failure reproduces.
settings.register_profile("ci", max_examples=200, deadline=None, derandomize=True, database=None)
settings.load_profile("ci")


@st.composite
def image_and_box(draw, max_side: int = 2000):
    """(width, height, [xmin, ymin, xmax, ymax]) with 0 <= xmin < xmax <= width, same for y, and
    sides of at least 0.001 pixel (thinner boxes vanish in float64 rounding, and no annotation has
    them)."""
    width = draw(st.integers(1, max_side))
    height = draw(st.integers(1, max_side))
    x0 = draw(st.floats(0, width - 1e-3))
    y0 = draw(st.floats(0, height - 1e-3))
    x1 = draw(st.floats(x0 + 1e-3, width))
    y1 = draw(st.floats(y0 + 1e-3, height))
    return width, height, [x0, y0, x1, y1]


@given(image_and_box(), st.sampled_from(["none", "shrink", "crop"]), st.integers(16, 640))
def test_encode_then_decode_gives_the_box_back_in_original_pixels(case, mode, size):
    width, height, box = case
    boxes = torch.tensor([box], dtype=torch.float64)
    moved, keep = transform_boxes(boxes, width, height, mode, size)
    out_width, out_height = output_size(width, height, mode, size)
    encoded = encode_boxes(moved, out_width, out_height)
    assert ((encoded >= 0) & (encoded <= 1 + 1e-9)).all()  # fractions of the network input
    back = encoded_to_image(encoded, width, height, mode, size)
    if mode != "crop":
        assert keep.all()
        assert torch.allclose(back[0], boxes[0], atol=1e-6 * max(width, height))
        return
    left, top = crop_window(width, height, size)  # the window in original pixels
    window = [max(left, 0), max(top, 0), min(left + size, width), min(top + size, height)]
    clipped = [
        max(box[0], window[0]),
        max(box[1], window[1]),
        min(box[2], window[2]),
        min(box[3], window[3]),
    ]
    inside = clipped[2] > clipped[0] and clipped[3] > clipped[1]
    assert bool(keep[0]) == inside
    if inside:
        assert torch.allclose(back[0], torch.tensor(clipped, dtype=torch.float64), atol=1e-6 * size)


def xyxy(draw_box):
    x0, y0, w, h = draw_box
    return [x0, y0, x0 + w, y0 + h]


# Sides of 0 (empty boxes) or from 0.001 pixel: denormal sides (5e-324) make IoU rounding noise.
side = st.one_of(st.just(0.0), st.floats(1e-3, 100))
box_strategy = st.tuples(st.floats(-100, 100), st.floats(-100, 100), side, side).map(xyxy)


@given(
    st.lists(box_strategy, min_size=1, max_size=6), st.lists(box_strategy, min_size=1, max_size=6)
)
def test_iou_is_symmetric_bounded_and_one_on_itself(a, b):
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    ab, ba = box_iou(a, b), box_iou(b, a)
    ab, ba = ab.nan_to_num(0.0), ba.nan_to_num(0.0)  # two empty boxes: 0 / 0 in torchvision
    assert torch.allclose(ab, ba.T)
    assert ((ab >= 0) & (ab <= 1 + 1e-12)).all()
    n = min(len(a), len(b))
    assert torch.allclose(paired_iou(a[:n], b[:n]), ab.diagonal()[:n])
    areas = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    self_iou = paired_iou(a, a)
    assert torch.allclose(self_iou[areas > 0], torch.ones_like(self_iou[areas > 0]))
    assert (self_iou[areas == 0] == 0).all()  # an empty box overlaps nothing, not even itself
