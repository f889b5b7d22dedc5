"""The bootstrap over val images: weights of draws, a class's AP on every draw (against the AP of
the drawn list built explicitly), intervals, and the paired change of two groups of runs, with
hand-computed cases (identical revisions, one image of four fixed, runs of two seeds)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from pipeline_lib.measures.bootstrap import (
    Change,
    RankedClass,
    class_ap_draws,
    image_weights,
    interval,
    map_draws,
    paired_change,
    ranked_classes,
)
from pipeline_lib.measures.metrics import (
    COCO_RECALLS,
    coco_match_image,
    match_image,
    mean_ap,
    voc_average_precision,
)
from pipeline_lib.measures.records import Judging, SingleRecords
from pipeline_lib.reporting.review import judge


def test_weights_count_each_draw_of_n_images_and_repeat_with_the_seed():
    weights = image_weights(5, 400, seed=3)
    assert weights.shape == (400, 5) and weights.dtype == torch.float32
    assert (weights.sum(1) == 5).all() and (weights == weights.round()).all()
    assert torch.equal(weights, image_weights(5, 400, seed=3))
    assert not torch.equal(weights, image_weights(5, 400, seed=4))
    # each image is drawn once per draw on average, and sometimes not at all
    assert weights.mean(0).tolist() == pytest.approx([1.0] * 5, abs=0.15)
    assert (weights == 0).any(1).float().mean() > 0.5  # 1 - 5!/5^5 = 0.96 of the draws


def ranked(image, outcome, positives) -> RankedClass:
    return RankedClass(
        torch.tensor(image),
        torch.tensor(outcome, dtype=torch.int8)[:, None],
        torch.tensor(positives),
    )


def test_class_ap_by_hand_on_two_draws():
    """Ranked: a hit in image 0, a false positive in image 1, a hit in image 1; one object in
    each image. All images once: precision 1, 1/2, 2/3 -> AP = 1/2 * 1 + 1/2 * 2/3 = 5/6.
    Image 1 drawn twice, image 0 not: hits (weight 2) at rank 3 only, behind the false positive
    (weight 2): precision 2/4 at recall 1 -> AP 1/2. Image 0 alone: AP 1."""
    c = ranked([0, 1, 1], [1, 0, 1], [1, 1])
    weights = torch.tensor([[1.0, 1.0], [0.0, 2.0], [2.0, 0.0]], dtype=torch.float64)
    assert class_ap_draws(c, weights)[0].tolist() == pytest.approx([5 / 6, 0.5, 1.0])
    # COCO's 101 points on all images: envelope 1 up to recall 1/2, 2/3 beyond: (51 + 50 * 2/3)
    # / 101 (the eps in COCO's precision moves it by 1e-16)
    coco = class_ap_draws(c, weights[:1], COCO_RECALLS)[0, 0]
    assert float(coco) == pytest.approx((51 + 50 * 2 / 3) / 101, abs=1e-12)


def test_a_draw_without_the_class_s_objects_is_nan_and_left_out_of_the_mean():
    cat = ranked([0], [1], [1, 0])  # one object, in image 0
    dog = ranked([1], [0], [0, 1])  # one object in image 1, a false positive on it
    weights = torch.tensor([[1.0, 1.0], [0.0, 2.0], [2.0, 0.0]], dtype=torch.float64)
    ap = class_ap_draws(cat, weights)[0]
    assert ap[0] == 1.0 and ap[1].isnan() and ap[2] == 1.0
    # draw 0: (1 + 0) / 2; draw 1: dog alone, 0; draw 2: cat alone, 1
    assert map_draws([cat, dog], weights).tolist() == [0.5, 0.0, 1.0]
    assert map_draws([], weights).tolist() == [0.0] * 3
    # draw 1 holds no cat at all: the cats' mAP there is 0, as metrics.mean_ap of no class
    assert map_draws([cat], weights).tolist() == [1.0, 0.0, 1.0]


def test_detections_left_out_count_for_nothing():
    """A detection counted as neither (a difficult object's match, -1) changes no precision."""
    with_ignored = ranked([0, 0, 1], [1, -1, 1], [1, 1])
    without = ranked([0, 1], [1, 1], [1, 1])
    weights = image_weights(2, 50, seed=0)
    assert torch.equal(class_ap_draws(with_ignored, weights), class_ap_draws(without, weights))


def random_images(seed: int, n_images: int = 12, n_classes: int = 3):
    """Detections with distinct scores around random objects, and the objects."""
    g = torch.Generator().manual_seed(seed)
    detections, truth = [], []
    for _ in range(n_images):
        n = int(torch.randint(1, 4, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * 200
        boxes = torch.cat(
            [xy, xy + 20 + torch.rand(n, 2, generator=g, dtype=torch.float64) * 60], 1
        )
        labels = torch.randint(0, n_classes, (n,), generator=g)
        jitter = (torch.rand(n, 4, generator=g, dtype=torch.float64) - 0.5) * 24
        noise = torch.rand(2, 2, generator=g, dtype=torch.float64) * 200
        found = torch.cat([boxes + jitter, torch.cat([noise, noise + 30], 1)])
        found[:, 2:] = torch.maximum(found[:, 2:], found[:, :2] + 1)
        found_labels = torch.cat([labels, torch.randint(0, n_classes, (2,), generator=g)])
        scores = torch.rand(len(found), generator=g, dtype=torch.float64)
        detections.append((found, scores, found_labels))
        truth.append((boxes, labels, torch.zeros(n, dtype=torch.bool)))
    return detections, truth


def ranked_images(detections, truth, matching) -> list[RankedClass]:
    """The RankedClass lists of images, each detection's outcomes from `matching`."""
    outcome = torch.cat([matching(d, t) for d, t in zip(detections, truth, strict=True)])
    image = torch.cat([torch.full((len(d[1]),), n) for n, d in enumerate(detections)])
    positives = torch.stack([torch.bincount(t[1], minlength=3) for t in truth])
    return ranked_classes(
        torch.cat([d[1] for d in detections]),
        torch.cat([d[2] for d in detections]),
        image,
        outcome.reshape(len(outcome), -1),
        positives,
    )


def test_weighted_ap_equals_the_ap_of_the_drawn_list_built_explicitly():
    """For each of 30 draws, the images repeated as drawn (each copy a new image) and measured by
    metrics.voc_average_precision, the devkit-checked code: the same mAP as the weighted one.
    And COCO's: the drawn list's (matched again, every weight 1) equals the weighted one."""
    detections, truth = random_images(seed=1)

    def voc(detections, truth):
        return match_image(detections, truth, 0.5, "continuous")[0]

    weights = image_weights(len(truth), 30, seed=5).double()  # float64: equal to 1e-12
    ours = map_draws(ranked_images(detections, truth, voc), weights)
    coco = map_draws(ranked_images(detections, truth, coco_match_image), weights, COCO_RECALLS)
    for k, row in enumerate(weights.long().tolist()):
        drawn = [n for n, w in enumerate(row) for _ in range(w)]
        found, objects = [detections[n] for n in drawn], [truth[n] for n in drawn]
        per_class = voc_average_precision(found, objects, 3, 0.5, "continuous")
        assert float(ours[k]) == pytest.approx(mean_ap(per_class), abs=1e-12), k
        explicit = ranked_images(found, objects, coco_match_image)
        ones = torch.ones(1, len(drawn), dtype=torch.float64)
        assert float(coco[k]) == pytest.approx(float(map_draws(explicit, ones, COCO_RECALLS)[0]))
    assert len(set(ours.tolist())) > 20  # the draws differ
    # the intervals' float32 weights give the same figures to float32's precision
    assert torch.allclose(
        map_draws(ranked_images(detections, truth, voc), weights.float()).double(), ours, atol=1e-5
    )


def test_interval_holds_the_middle_share_by_linear_interpolation():
    draws = torch.arange(101, dtype=torch.float64)  # 0 .. 100
    assert interval(draws, 0.95) == pytest.approx((2.5, 97.5))
    assert interval(draws, 0.5) == pytest.approx((25.0, 75.0))


def single_records(correct: list[bool], iou: list[float] | None = None) -> SingleRecords:
    n = len(correct)
    frame = pd.DataFrame(
        {
            "image_id": [f"im{i}" for i in range(n)],
            "path": "x.jpg",
            "width": 10,
            "height": 10,
            "label": [0] * n,
            "predicted": [0 if c else 1 for c in correct],
            "score": 0.9,
            "iou": iou or [0.5] * n,
        }
    )
    for prefix in ("true", "pred"):
        for corner in ("xmin", "ymin", "xmax", "ymax"):
            frame[f"{prefix}_{corner}"] = 1.0
    return SingleRecords(["cat", "dog"], Judging(0.5, "continuous", 0.2), ".", frame)


def test_identical_revisions_change_by_exactly_nothing():
    runs = single_records([True, False, True, True], [0.9, 0.1, 0.4, 0.7])
    for j in judge([runs], [runs], draws=500, confidence=0.95):
        assert (j.change.low, j.change.high, j.change.verdict) == (0.0, 0.0, "within noise")
        assert j.change.old == j.change.new


def test_fixing_one_image_of_four_by_hand():
    """Accuracy 3/4 -> 4/4: on a draw the change is (times the fixed image is drawn) / 4, that
    count Binomial(4, 1/4): 0, 1, 2, 3, 4 with probabilities 0.316, 0.422, 0.211, 0.047, 0.004,
    cumulated 0.316, 0.738, 0.949, 0.996: the 2.5 % quantile is 0, the 97.5 % one 3/4. So the
    interval is [0, 0.75], and a change of +0.25 is within noise on four images."""
    [accuracy, _] = judge(
        [single_records([True, True, True, False])],
        [single_records([True, True, True, True])],
        draws=20_000,
        confidence=0.95,
    )
    assert (accuracy.change.old, accuracy.change.new) == (0.75, 1.0)
    assert (accuracy.change.low, accuracy.change.high) == (0.0, 0.75)
    assert accuracy.change.verdict == "within noise" and accuracy.images == 4


def test_runs_of_a_side_are_resampled_too_by_hand():
    """Figures that do not depend on the draw of images: base runs 0.5 and 0.7, one new run 0.6.
    The base's mean over its two runs drawn with replacement is 0.5, 0.6 or 0.7 (1/4, 1/2, 1/4),
    so the change is +0.1, 0 or -0.1 and its 95 % interval [-0.1, +0.1]; the runs' mean 0.6
    equals the new run's."""
    draws = 4000
    base = torch.tensor([0.5, 0.7], dtype=torch.float64).expand(draws, 2)
    new = torch.full((draws, 1), 0.6, dtype=torch.float64)
    change = paired_change(base, new, seed=0)
    assert set(change.round(decimals=9).tolist()) == {-0.1, 0.0, 0.1}
    assert float((change == 0).double().mean()) == pytest.approx(0.5, abs=0.03)
    assert interval(change, 0.95) == pytest.approx((-0.1, 0.1))
    # one run a side: nothing but the images moves it
    assert torch.equal(paired_change(base[:, :1], new, seed=0), new[:, 0] - base[:, 0])


def test_as_many_runs_a_side_are_drawn_in_pairs():
    """Seeds 0 and 1 on both sides, a change that does nothing to either (0.5 and 0.7 both
    sides): run k is drawn with run k, so the change is 0 on every draw. Unpaired sides of
    0.5, 0.7 and 0.6, 0.6 spread as one side alone would: -0.1, 0, +0.1."""
    draws = 2000
    runs = torch.tensor([0.5, 0.7], dtype=torch.float64).expand(draws, 2)
    assert torch.equal(paired_change(runs, runs, seed=1), torch.zeros(draws, dtype=torch.float64))
    flat = torch.full((draws, 2), 0.6, dtype=torch.float64)
    assert set(paired_change(runs, flat, seed=1).round(decimals=9).tolist()) == {-0.1, 0.0, 0.1}


def test_the_runs_drawn_follow_the_seed_and_not_the_sides_order():
    """The report's seed decides which runs each draw takes: the same seed, the same draws;
    another seed, others. A side of one run draws nothing, so B against A is minus A against B
    whichever side holds several runs."""
    draws = 500
    one = torch.full((draws, 1), 0.6, dtype=torch.float64)
    three = torch.tensor([0.5, 0.7, 0.9], dtype=torch.float64).expand(draws, 3)
    change = paired_change(one, three, seed=3)
    assert torch.equal(paired_change(one, three, seed=3), change)
    assert not torch.equal(paired_change(one, three, seed=4), change)
    assert torch.equal(paired_change(three, one, seed=3), -change)


@pytest.mark.parametrize(
    ("low", "high", "verdict"),
    [
        (0.01, 0.2, "better"),
        (-0.2, -0.01, "worse"),
        (0.0, 0.2, "within noise"),
        (-0.2, 0.0, "within noise"),
        (-0.1, 0.1, "within noise"),
    ],
)
def test_verdicts(low, high, verdict):
    assert Change(0.5, 0.6, low, high, 0.95).verdict == verdict
