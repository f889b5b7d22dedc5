"""How sure a figure is: the percentile bootstrap over the val images, alone and paired.

A draw takes as many images as the set has, with replacement (Efron's bootstrap; the PASCAL VOC
organisers judged entries so, Everingham et al., IJCV 2015). A draw is a row of weights, how often
each image was drawn, so a figure is computed on every draw from one set of per-image results,
without matching anything again: a detection drawn twice counts twice. The interval holds the
middle `confidence` of the draws' figures.

- `image_weights`: D draws over I images as (D, I) counts, from a seed.
- `RankedClass`, `class_ap_draws`, `map_draws`: a class's AP, and the mean over classes (the
  devkit's all-point AP, or COCO's 101 points) on every draw at once.
- `interval`: the percentile interval of a figure's draws.
- `paired_change`, `Change`: the change of a figure between two groups of runs (one run or
  several seeds a side) on the same draws of the images, its interval and verdict.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def image_weights(n_images: int, draws: int, seed: int) -> torch.Tensor:
    """(draws, n_images) float32: how often each image is drawn, each draw n_images images with
    replacement (every row sums to n_images; float32 counts are exact to 2^24, and halve the
    memory the figures on them move). The same arguments give the same weights."""
    generator = torch.Generator().manual_seed(seed)
    drawn = torch.randint(n_images, (draws, n_images), generator=generator)
    weights = torch.zeros(draws, n_images, dtype=torch.float32)
    return weights.scatter_add_(1, drawn, torch.ones_like(drawn, dtype=torch.float32))


# A ranked detection's outcome (metrics.py's codes: found an object, false positive, neither).
_FOUND, _IGNORED = 1, -1


@dataclass
class RankedClass:
    """One class's detections over a set of images, ranked by score (ties in input order), and
    its objects: `image` (N,) int64 the image of each detection, `outcome` (N, T) int8 its
    outcome under each of T matchings (1 found an object, 0 a false positive, -1 neither: left
    out), `positives` (I,) the objects to find in each image."""

    image: torch.Tensor
    outcome: torch.Tensor
    positives: torch.Tensor


def ranked_classes(
    scores: torch.Tensor,
    labels: torch.Tensor,
    image: torch.Tensor,
    outcome: torch.Tensor,
    positives: torch.Tensor,
) -> list[RankedClass]:
    """A RankedClass per class with objects (its index in the (I, K) `positives`, objects to
    find per image and class), from N detections in image order (`scores`, `labels`, `image`
    (N,), `outcome` (N, T)), each class's ranked by score (ties in that order)."""
    order = torch.argsort(scores.double(), descending=True, stable=True)
    labels, image, outcome = labels[order], image[order], outcome[order]
    return [
        RankedClass(image[labels == k], outcome[labels == k], positives[:, k])
        for k in range(positives.shape[1])
        if positives[:, k].any()
    ]


def class_ap_draws(
    ranked: RankedClass, weights: torch.Tensor, recall_points: torch.Tensor | None = None
) -> torch.Tensor:
    """(T, D) AP of the class under each matching on each draw of `weights` (D, I), in the
    weights' dtype; NaN on a draw without any of its objects. `recall_points` None: the devkit's
    all-point AP (the area under the precision envelope); (R,): the mean of the envelope at the
    first rank reaching each recall point, 0 if none does (COCO's 101 points, with COCO's
    precision tp / (tp + fp + eps)).

    A detection of an image drawn w times stands for w detections in a row: between those the
    envelope is set by the last of a run of true positives and the first of a run of false
    positives, so the weighted curve gives the AP of the drawn list exactly (up to ties in score
    across images, whose order the drawn list would not fix either). Only the true positives'
    ranks are needed: the envelope's maxima lie there. The weight ranked before each is summed
    segment by segment, the detections between two such ranks at once, less the weight of
    those left out. (Arrays are ranks x draws: a rank's weights are a row of weights.T.)"""
    return _class_ap(ranked, weights.T.contiguous(), recall_points)


def _class_ap(
    ranked: RankedClass, by_image: torch.Tensor, recall_points: torch.Tensor | None
) -> torch.Tensor:
    """class_ap_draws with the weights as (I, D): a rank's weights are the row of its image."""
    n, matchings = ranked.outcome.shape
    draws, dtype = by_image.shape[1], by_image.dtype
    positives = ranked.positives.to(dtype) @ by_image  # (D,)
    out = torch.full((matchings, draws), float("nan"), dtype=dtype)
    anchors = torch.nonzero((ranked.outcome == _FOUND).any(1)).flatten()  # ranks found by any
    segment = torch.searchsorted(anchors, torch.arange(n), right=True)  # anchors at or before
    kept = segment < len(anchors)  # detections after the last anchor come before none
    sums = by_image.new_zeros(len(anchors), draws)
    sums.index_add_(0, segment[kept], by_image[ranked.image[kept]])
    before = torch.cumsum(sums, 0)  # (anchors, D): the weight ranked before each anchor
    eps = 0.0 if recall_points is None else torch.finfo(torch.float64).eps  # COCO's np.spacing(1)
    if recall_points is not None:
        points = recall_points.to(dtype).expand(draws, -1).contiguous()
    for t in range(matchings):
        found = torch.nonzero(ranked.outcome[:, t] == _FOUND).flatten()
        left_out = torch.nonzero(ranked.outcome[:, t] == _IGNORED).flatten()
        w_found = by_image[ranked.image[found]]  # (m, D)
        tp = torch.cumsum(w_found, 0)
        skipped = torch.cumsum(by_image[ranked.image[left_out]], 0)
        skipped = torch.cat([skipped.new_zeros(1, draws), skipped])
        total = (
            before[torch.searchsorted(anchors, found)]
            + w_found
            - skipped[torch.searchsorted(left_out, found)]
        )  # the weight counted up to each true positive, itself included
        precision = torch.where(total > 0, tp / (total + eps), 0.0)
        envelope = torch.flip(torch.cummax(torch.flip(precision, [0]), 0).values, [0])
        if recall_points is None:
            ap = (w_found * envelope).sum(0) / positives
        elif len(found):
            recall = (tp / positives).T.contiguous()  # (D, m), sorted along m
            first = torch.searchsorted(recall, points)  # the first rank reaching the point
            values = envelope.T.gather(1, first.clamp(max=len(found) - 1))
            ap = torch.where(first < len(found), values, 0.0).mean(1)
        else:
            ap = torch.zeros(draws, dtype=dtype)
        out[t] = torch.where(positives > 0, ap, float("nan"))
    return out


def map_draws(
    classes: list[RankedClass], weights: torch.Tensor, recall_points: torch.Tensor | None = None
) -> torch.Tensor:
    """(D,) the mean AP (`class_ap_draws`) over the classes and matchings on each draw: per draw,
    over the classes with objects in it, each class's mean over its T matchings (COCO's mAP
    @[.5:.95] with ten); 0 where no class has objects, as metrics.mean_ap."""
    if not classes:
        return torch.zeros(len(weights), dtype=torch.float64)
    by_image = weights.T.contiguous()
    per_class = torch.stack([_class_ap(c, by_image, recall_points).mean(0) for c in classes])
    present = ~per_class.isnan()
    total = torch.where(present, per_class, 0.0).sum(0)
    count = present.sum(0)
    return torch.where(count > 0, total / count.clamp(min=1), 0.0)


def interval(draws: torch.Tensor, confidence: float) -> tuple[float, float]:
    """The percentile interval holding the middle `confidence` of the (D,) draws (linear
    interpolation between order statistics, as numpy's default)."""
    tail = (1 - confidence) / 2
    low, high = torch.quantile(draws.double(), torch.tensor([tail, 1 - tail], dtype=torch.float64))
    return float(low), float(high)


def paired_change(base: torch.Tensor, new: torch.Tensor, seed: int) -> torch.Tensor:
    """(D,) draws of the change new - old of a figure's mean over runs. `base` (D, Rb) and `new`
    (D, Rn): each run's figure on the same D draws of the images. A side of several runs (seeds)
    is also resampled, its runs drawn with replacement in each draw, so that the interval covers
    the spread between runs as well as the images'; with as many runs a side, run k of each side
    is drawn together (`make compare` gives both sides the same seeds: what a seed does to both
    cancels; for unrelated runs the pairing changes nothing on average). One run is kept as it
    is."""
    generator = torch.Generator().manual_seed(seed)
    picks = {}
    for side in (base, new):
        runs = side.shape[1]
        if runs > 1 and runs not in picks:
            picks[runs] = torch.randint(runs, side.shape, generator=generator)
    means = [
        (side.gather(1, picks[side.shape[1]]) if side.shape[1] > 1 else side).mean(1)
        for side in (base, new)
    ]
    return means[1] - means[0]


@dataclass(frozen=True)
class Change:
    """A figure of two groups of runs: each side's mean over its runs on all the images, and the
    interval of the change (new - old) at `confidence`."""

    old: float
    new: float
    low: float
    high: float
    confidence: float

    @property
    def verdict(self) -> str:
        """better or worse when the whole interval lies on one side of 0, within noise else."""
        if self.low > 0:
            return "better"
        if self.high < 0:
            return "worse"
        return "within noise"
