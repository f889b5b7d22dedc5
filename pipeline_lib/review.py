"""The pieces of a pull-request report: what changed between two revisions, as Markdown and PNGs.

The report command (stages/report.py) asks DVC for the params, metrics and plots of two revisions
and hands them here in plain structures; this module knows nothing of DVC.

- `MetricChange` / `metrics_table`: one row per changed figure, the headline figures first.
- `changed_revisions`: whether a Vega-Lite plot's data differ between revisions.
- `render_vega_lite`: a Vega-Lite spec with its data inline -> PNG, without a browser (vl-convert).
- `ImageChange` / `figure_table`: PNG figures that differ, the two revisions side by side;
  `image_rows`: images two to a row.
- `report_page`: the Markdown report as a standalone HTML page (for CI artifacts and browsers).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# A PR column is about 880 CSS pixels wide on GitHub, two plots to a row: a plot whose template
# leaves its width to the page ("container") gets this size; every plot is rendered at twice its
# CSS size for sharp text on high-density screens.
PLOT_WIDTH = 420
PLOT_HEIGHT = 280
PLOT_SCALE = 2
VEGA_LITE = "v5.21"  # DVC's plot templates declare Vega-Lite v5; the plots page carries this one


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
