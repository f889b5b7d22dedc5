"""The pieces of a pull-request report: what changed between two revisions, as Markdown and PNGs.

The report command (stages/report.py) asks DVC for the params, metrics and plots of two revisions
and hands them here in plain structures; this module knows nothing of DVC.

- `judge` / `judged_table`: each headline figure of two groups of runs (one run or several
  seeds a side) with the bootstrap interval of its change over the val images and a verdict
  (better, worse, within noise), from the runs' per-image records (records.py).
- `error_splits` / `errors_table`: where each side's detector errs (errortypes.py), and what the
  change moved.
- `moved_images` / `moved_table`: the val images whose detections changed most, each drawn as both
  revisions left it (plots.outcome_pair).
- `MetricChange` / `metrics_table`: one row per changed figure, the headline figures first.
- `changed_revisions`: whether a Vega-Lite plot's data differ between revisions.
- `render_vega_lite`: a Vega-Lite spec with its data inline -> PNG, without a browser (vl-convert).
- `ImageChange` / `figure_table`: PNG figures that differ, the two revisions side by side;
  `image_rows`: images two to a row.
- `report_page`: the Markdown report as a standalone HTML page (for CI artifacts and browsers).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from matplotlib.figure import Figure
from PIL import Image

from pipeline_lib.base.errors import PipelineError
from pipeline_lib.measures.bootstrap import Change, image_weights, interval, paired_change
from pipeline_lib.measures.errortypes import ERROR_NAMES, ERROR_TYPES, ErrorSplit, split_errors
from pipeline_lib.measures.metrics import FALSE_POSITIVE, TRUE_POSITIVE
from pipeline_lib.measures.records import BOX, MultiRecords, Records
from pipeline_lib.reporting.plots import Outcomes, outcome_pair, save_figure

# A PR column is about 880 CSS pixels wide on GitHub, two plots to a row: a plot whose template
# leaves its width to the page ("container") gets this size; every plot is rendered at twice its
# CSS size for sharp text on high-density screens.
PLOT_WIDTH = 420
PLOT_HEIGHT = 280
PLOT_SCALE = 2
VEGA_LITE = "v5.21"  # DVC's plot templates declare Vega-Lite v5; the plots page carries this one


def common_images(runs: Sequence[Records]) -> list[str]:
    """The val images every run has, in the first run's order (a clear error if none)."""
    ids = runs[0].images["image_id"].tolist()
    for run in runs[1:]:
        theirs = set(run.images["image_id"])
        ids = [i for i in ids if i in theirs]
    if not ids:
        raise PipelineError(
            "the revisions compared share no val image: compare runs on one dataset"
        )
    return ids


@dataclass(frozen=True)
class Judged:
    """A headline figure of two groups of runs: bootstrap.Change (each side's mean over its runs,
    the interval of the change and its verdict) on `images` common val images."""

    figure: str
    change: Change
    images: int


def judge(
    base: Sequence[Records], new: Sequence[Records], draws: int, confidence: float, seed: int = 0
) -> list[Judged]:
    """Each figure of the records' FIGURES between the `base` and `new` runs (records of one kind,
    one run or several a side): the same `draws` draws of their common val images for every run
    (paired), the runs of a side of several resampled too (bootstrap.paired_change)."""
    ids = common_images([*base, *new])
    weights = image_weights(len(ids), draws, seed)
    ones = torch.ones(1, len(ids), dtype=torch.float64)
    sides = []
    for runs in (base, new):
        restricted = [run.restricted(ids) for run in runs]
        sides.append(
            (
                [run.figure_draws(weights) for run in restricted],
                [run.figure_draws(ones) for run in restricted],
            )
        )
    judged = []
    for figure in base[0].FIGURES:
        (b_draws, b_own), (n_draws, n_own) = sides
        change = paired_change(
            torch.stack([d[figure] for d in b_draws], 1),
            torch.stack([d[figure] for d in n_draws], 1),
            seed + 1,
        )
        low, high = interval(change, confidence)
        old = sum(float(o[figure][0]) for o in b_own) / len(b_own)
        mean = sum(float(o[figure][0]) for o in n_own) / len(n_own)
        judged.append(Judged(figure, Change(old, mean, low, high, confidence), len(ids)))
    return judged


def judged_table(
    rows: Sequence[tuple[str, Judged]], revs: tuple[str, str], runs: tuple[int, int]
) -> str:
    """Markdown table of (metrics file, Judged) rows: both sides' figures (means over `runs`
    runs), the change, its interval and the verdict (in bold when not within noise)."""
    sides = [f"{rev} ({n} runs)" if n > 1 else rev for rev, n in zip(revs, runs, strict=True)]
    confidence = rows[0][1].change.confidence if rows else 0.95
    lines = [
        f"| file | figure | {sides[0]} | {sides[1]} | change | {confidence:.0%} interval of the "
        "change | verdict |".replace("%", " %"),
        "|---|---|---:|---:|---:|---|---|",
    ]
    for path, j in rows:
        c = j.change
        verdict = c.verdict if c.verdict == "within noise" else f"**{c.verdict}**"
        lines.append(
            f"| {path} | **{j.figure}** | {c.old:.4f} | {c.new:.4f} | {c.new - c.old:+.4f} | "
            f"{c.low:+.4f} … {c.high:+.4f} | {verdict} |"
        )
    return "\n".join(lines)


def noise_statement(runs: tuple[int, int], images: int) -> str:
    """What the intervals cover, in one paragraph for the report."""
    if max(runs) == 1:
        return (
            f"One run a side: each interval covers the resampling of the {images} val images "
            "only, **not** the spread between training seeds (a seed alone moves VOC mAP by "
            "about 0.03 here). Run several seeds a side (`make compare`) before calling a change "
            "real."
        )
    return (
        f"Runs compared: {runs[0]} and {runs[1]}. Each interval covers the resampling of the "
        f"{images} val images and the spread between the runs of each side (resampled in every "
        "draw)."
    )


def headline_section(
    rows: Sequence[tuple[str, Judged]], notes: Sequence[str], revs: tuple[str, str], runs
) -> str:
    """'## Headline figures': the judged table and what its intervals cover, then one line per
    note (a side without records: its figures stay in the metrics table)."""
    text = "## Headline figures\n\n"
    if rows:
        text += judged_table(rows, revs, runs) + "\n\n" + noise_statement(runs, rows[0][1].images)
    lines = [
        f"- {note}: its headline figures are in Metrics below, without intervals." for note in notes
    ]
    return text + ("\n\n" if rows and lines else "") + "\n".join(lines)


def errors_section(base: Sequence[MultiRecords], new: Sequence[MultiRecords], revs) -> str:
    """'## Where the detector errs': both sides' error types on their common images."""
    ids = common_images([*base, *new])
    return "## Where the detector errs\n\n" + errors_table(
        error_splits(base, ids), error_splits(new, ids), revs
    )


MOVED_IMAGES = 4  # val images shown both ways in "Images the change moved"


def moved_section(
    base: MultiRecords, new: MultiRecords, revs: tuple[str, str], folder: Path
) -> str:
    """'## Images the change moved': the MOVED_IMAGES val images whose detections changed most,
    each drawn both ways into folder/moved/ (the photos from `new`'s dataset folder; one that
    cannot be read is listed without its picture)."""
    moved = moved_images(base, new, MOVED_IMAGES)
    if not moved:
        return "## Images the change moved\n\nNo val image's detections changed."
    drawn = {}
    paths = new.images.set_index("image_id")["path"]
    for m in moved:
        try:
            with Image.open(Path(new.dataset_dir) / paths[m.image_id]) as photo:
                figure = moved_figure(m, revs, photo.convert("RGB"))
        except OSError:
            continue
        name = re.sub(r"[^\w.-]", "_", m.image_id) + ".png"
        save_figure(figure, folder / "moved" / name)
        drawn[m.image_id] = f"moved/{name}"
    text = (
        f"The {len(moved)} val images whose found and false detections (from score "
        f"{new.judging.draw_score}) changed most; green: found, red: false, orange dashed: missed."
    )
    return f"## Images the change moved\n\n{text}\n\n" + moved_table(moved, revs, drawn.get)


def error_splits(runs: Sequence[MultiRecords], ids: list[str]) -> list[ErrorSplit]:
    """TIDE's split (errortypes.split_errors at each run's judging) of each run on the images
    `ids`."""
    splits = []
    for run in runs:
        detections, truth = run.restricted(ids).pairs()
        j = run.judging
        classes = len(run.classes)
        splits.append(
            split_errors(detections, truth, classes, overlap=j.overlap, foreground=j.iou_threshold)
        )
    return splits


def errors_table(base: Sequence[ErrorSplit], new: Sequence[ErrorSplit], revs) -> str:
    """Markdown: each error type's mAP cost (its gain if fixed alone) and count on both sides
    (means over the runs, and their range when a side has several), the change; then, with
    several runs a side, a line per type that moved beyond the runs' spread: the two sides'
    ranges apart, and the change at least as large as the wider range. (With one run a side
    nothing is named: a seed alone moves these costs a lot.)"""
    lines = [
        f"| error type | {revs[0]}: mAP cost | {revs[1]}: mAP cost | change | errors |",
        "|---|---:|---:|---:|---:|",
    ]
    moved = []
    for kind in ERROR_TYPES:
        sides = [[split.gains[kind] for split in runs] for runs in (base, new)]
        old, now = (sum(values) / len(values) for values in sides)
        counted = " → ".join(
            f"{sum(s.counts[kind] for s in runs) / len(runs):.0f}" for runs in (base, new)
        )
        cells = [_spread(values) for values in sides]
        lines.append(f"| {kind} | {cells[0]} | {cells[1]} | {now - old:+.4f} | {counted} |")
        apart = max(sides[1]) < min(sides[0]) or min(sides[1]) > max(sides[0])
        wider = max(max(values) - min(values) for values in sides)
        if apart and abs(now - old) >= wider:
            way = "fewer" if now < old else "more"
            named = ERROR_NAMES[kind]
            moved.append(f"- {way} {named}: they cost {cells[0]} mAP before, {cells[1]} now")
    text = "\n".join(lines) + "\n\n"
    if len(base) < 2 or len(new) < 2:
        return text + (
            "One run a side: these costs move with the training seed too, so no type is named "
            "here; `make compare` names those that moved beyond the spread of several seeds."
        )
    rule = "the two sides' ranges apart, and the change at least the wider range"
    if not moved:
        return text + f"No error type moved beyond the runs' spread ({rule})."
    return text + "\n".join(moved) + f"\n\n(Named: {rule}.)"


def _spread(values: Sequence[float]) -> str:
    """'0.3484' for one run, '0.3484 (0.3312-0.3602)' for several: the mean and the range."""
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.4f}"
    return f"{mean:.4f} ({min(values):.4f}-{max(values):.4f})"


@dataclass(frozen=True)
class Moved:
    """A val image's detections on both sides: objects found, false positives and objects
    missed (from the draw score on), and what each side drew on it."""

    image_id: str
    counts: tuple[dict[str, int], dict[str, int]]
    outcomes: tuple[Outcomes, Outcomes]


def moved_images(base: MultiRecords, new: MultiRecords, count: int) -> list[Moved]:
    """The `count` common val images whose found and false detections (scoring `new`'s
    judging.draw_score or more) changed most between the sides (|change in found| + |change in
    false|; ties in image order), those that did not change left out."""
    ids = common_images([base, new])
    score = new.judging.draw_score
    tallies = [_tally(side.restricted(ids), score) for side in (base, new)]
    moved = (tallies[1][["found", "false"]] - tallies[0][["found", "false"]]).abs().sum(axis=1)
    order = moved[moved > 0].sort_values(ascending=False, kind="stable").index[:count]
    return [
        Moved(
            image_id,
            tuple(
                {k: int(t.at[image_id, k]) for k in ("found", "false", "missed")} for t in tallies
            ),
            tuple(_outcomes(side, image_id, score) for side in (base, new)),
        )
        for image_id in order
    ]


def _tally(records: MultiRecords, score: float) -> pd.DataFrame:
    """Per image (index image_id, in records order): found, false, missed from `score` on."""
    d = records.detections[records.detections["score"] >= score]
    found = d[d["outcome"] == TRUE_POSITIVE].groupby("image_id").size()
    false = d[d["outcome"] == FALSE_POSITIVE].groupby("image_id").size()
    objects = records.objects[~records.objects["difficult"]].groupby("image_id").size()
    frame = pd.DataFrame(index=records.images["image_id"])
    for name, values in (("found", found), ("false", false), ("objects", objects)):
        frame[name] = values.reindex(frame.index, fill_value=0).astype(int)
    frame["missed"] = frame["objects"] - frame["found"]
    return frame


def _outcomes(records: MultiRecords, image_id: str, score: float) -> Outcomes:
    d = records.detections[
        (records.detections["image_id"] == image_id) & (records.detections["score"] >= score)
    ]
    objects = records.objects[records.objects["image_id"] == image_id]
    names = records.classes
    found = d[d["outcome"] == TRUE_POSITIVE]
    false = d[d["outcome"] == FALSE_POSITIVE]
    missed = objects[~objects["difficult"] & ~objects["object"].isin(found["object"])]

    def boxes(frame: pd.DataFrame) -> torch.Tensor:
        return torch.tensor(frame[BOX].to_numpy(), dtype=torch.float64).reshape(-1, 4)

    def texts(frame: pd.DataFrame) -> list[str]:
        return [
            f"{names[k]} {s:.2f}" for k, s in zip(frame["class_id"], frame["score"], strict=True)
        ]

    return Outcomes(
        boxes(found),
        texts(found),
        boxes(false),
        texts(false),
        boxes(missed),
        [names[k] for k in missed["class_id"]],
    )


def moved_figure(moved: Moved, revs: tuple[str, str], photo: Image.Image) -> Figure:
    """Both sides' outcomes on the photo of a moved image, titled with their counts."""
    titled = []
    for rev, counts, outcomes in zip(revs, moved.counts, moved.outcomes, strict=True):
        title = (
            f"{rev}: {counts['found']} found, {counts['false']} false, {counts['missed']} missed"
        )
        titled.append(dataclasses.replace(outcomes, title=title))
    return outcome_pair(photo, tuple(titled), moved.image_id)


def moved_table(moved: Sequence[Moved], revs: tuple[str, str], link) -> str:
    """Markdown: per moved image its counts on both sides and its figure (`link(image_id)` the
    path of its PNG, None where the photo could not be read)."""
    lines = [
        f"| image | found ({revs[0]} → {revs[1]}) | false | missed |",
        "|---|---:|---:|---:|",
    ]
    pictures = []
    for m in moved:
        old, new = m.counts
        cells = [f"{old[k]} → {new[k]}" for k in ("found", "false", "missed")]
        lines.append(f"| {m.image_id} | " + " | ".join(cells) + " |")
        path = link(m.image_id)
        if path is not None:
            pictures.append(f"![{m.image_id}]({path})")
    return "\n".join(lines) + ("\n\n" + "\n\n".join(pictures) if pictures else "")


@dataclass(frozen=True)
class MetricChange:
    """One figure of a metrics file in two revisions (None: absent in that revision)."""

    path: str
    key: str  # dotted, as `dvc metrics` prints it: "val.accuracy"
    old: Any
    new: Any


@dataclass(frozen=True)
class ImageChange:
    """A figure file in two revisions (None: absent in that revision)."""

    name: str
    old: Path | None
    new: Path | None


def metrics_table(
    changes: Iterable[MetricChange], headline: Sequence[tuple[str, str]], revs: tuple[str, str]
) -> str:
    """Markdown table of `changes`: first the (path, key) pairs of `headline` in that order, then
    the others by path and key. Columns: file, metric, the two revisions, change (new - old)."""
    rank = {pair: i for i, pair in enumerate(headline)}
    rows = sorted(changes, key=lambda c: (rank.get((c.path, c.key), len(rank)), c.path, c.key))
    lines = [
        f"| file | metric | {revs[0]} | {revs[1]} | change |",
        "|---|---|---:|---:|---:|",
    ]
    for c in rows:
        name = f"**{c.key}**" if (c.path, c.key) in rank else c.key
        change = _signed(c.new - c.old) if _is_number(c.old) and _is_number(c.new) else ""
        lines.append(f"| {c.path} | {name} | {_cell(c.old)} | {_cell(c.new)} | {change} |")
    return "\n".join(lines)


def changed_revisions(rows: Sequence[dict], rev_field: str = "rev") -> bool:
    """True when the data rows of a plot (each with its revision in `rev_field`) differ between
    the revisions, or only one revision has rows: the plot is worth showing in a review."""
    by_rev: dict[Any, list[str]] = {}
    for row in rows:
        rest = {k: v for k, v in row.items() if k != rev_field}
        by_rev.setdefault(row.get(rev_field), []).append(json.dumps(rest, sort_keys=True))
    if len(by_rev) < 2:
        return True
    first, *others = (sorted(values) for values in by_rev.values())
    return any(values != first for values in others)


def render_vega_lite(spec: dict, path: Path) -> None:
    """Write the Vega-Lite `spec` (data inline) as a PNG at `path`, PLOT_WIDTH x PLOT_HEIGHT
    CSS pixels per view at PLOT_SCALE. A 'container' width (which only a web page can resolve)
    becomes PLOT_WIDTH; interactive bindings are ignored."""
    import vl_convert

    spec = _fixed_size(spec)
    png = vl_convert.vegalite_to_png(vl_spec=spec, vl_version=VEGA_LITE, scale=PLOT_SCALE)
    path.write_bytes(png)


def figure_table(changes: Sequence[ImageChange], revs: tuple[str, str], link) -> str:
    """Markdown table, one row per changed figure: its name, then the old and the new image
    (`link(path)` gives the path the Markdown uses; '(absent)' where a revision has none)."""
    lines = [f"| figure | {revs[0]} | {revs[1]} |", "|---|---|---|"]
    for c in changes:
        cells = [
            f"![{c.name} ({rev})]({link(p)})" if p else "(absent)"
            for rev, p in zip(revs, (c.old, c.new), strict=True)
        ]
        lines.append(f"| {c.name} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def image_rows(images: Sequence[tuple[str, str]], columns: int = 2) -> str:
    """Markdown table of (caption, link) images, `columns` to a row (a PR column shows two plots
    side by side at half size rather than one under the other at full size)."""
    rows = [images[i : i + columns] for i in range(0, len(images), columns)]
    lines = ["|" + " |" * columns, "|" + "---|" * columns]
    for row in rows:
        cells = [f"![{caption}]({link})" for caption, link in row]  # the plot has its title
        cells += [""] * (columns - len(row))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def same_bytes(a: Path | None, b: Path | None) -> bool:
    """Whether two files (None: absent) hold the same bytes."""
    if a is None or b is None:
        return a is b
    return a.read_bytes() == b.read_bytes()


def _fixed_size(spec: dict) -> dict:
    spec = dict(spec)
    for key, value in (("width", PLOT_WIDTH), ("height", PLOT_HEIGHT)):
        if key in spec and not _is_number(spec[key]):
            try:
                spec[key] = float(spec[key])
            except (TypeError, ValueError):
                spec[key] = value  # "container" and the like
    return spec


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if _is_number(value) and isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _signed(value: float) -> str:
    return f"{value:+.4g}" if value else "0"


PAGE_STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; font-size: 14px;
       max-width: 880px; margin: 24px auto; padding: 0 16px; color: #1f2328; }
table { border-collapse: collapse; margin: 12px 0; }
th, td { border: 1px solid #d1d9e0; padding: 4px 10px; }
th { background: #f6f8fa; }
td img { max-width: 400px; }
img { max-width: 100%; }
code { background: #f6f8fa; padding: 1px 4px; border-radius: 4px; }
"""


def report_page(markdown: str, title: str) -> str:
    """The Markdown `markdown` (with GitHub's tables) as a standalone HTML page; relative image
    links keep working beside it."""
    from html import escape

    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown)
    return (
        f'<!DOCTYPE html>\n<html>\n<head>\n<meta charset="utf-8">\n<title>{escape(title)}</title>'
        f"\n<style>{PAGE_STYLE}</style>\n</head>\n<body>\n{body}</body>\n</html>\n"
    )
