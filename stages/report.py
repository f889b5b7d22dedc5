"""Write a pull-request report: what a change does to params, metrics and plots, and whether
its headline figures moved beyond noise.

    python -m stages.report --base main              # -> report/report.md and its images
    python -m stages.report --base s0,s1,s2 --new c0,c1,c2    # runs of several seeds a side
    make report BASE=main

Compares NEW (by default the workspace: the pipeline's outputs as they are now, e.g. after `dvc
repro` or `dvc exp apply`) with BASE, each a git revision or experiment, or several separated by
commas (one group of runs, e.g. the seeds of `make compare`), and writes, under `--out`:
- report.md:
  - the params that changed,
  - the headline figures (mAP, COCO mAP, accuracy, mean IoU) of both sides, the change, its
    eval.confidence interval from eval.bootstrap paired draws of the val images (and of the runs
    of a side of several) and a verdict: better, worse or within noise; read from the
    evaluations' per-image records (a side without them gets one line saying so, and its
    figures appear in the metrics table only),
  - where the detector errs on both sides (TIDE's error types, errortypes.py) and the val images
    the change moved most, both sides' detections on each photo (moved/<image>.png),
  - every metric that changed (DVC's diff of the first run of each side, headline figures first),
    every Vega plot whose data changed and every PNG figure that changed;
  report.html: the same as a page (for a CI artifact or a browser);
- plots/<plot>.png: those Vega plots with both revisions (rendered by vl-convert, no browser);
- figures/<revision>_<file>.png: the two versions of each changed figure.
Unchanged plots and figures are left out. The CI workflow (.github/workflows/pr-report.yaml)
posts report.md as a pull-request comment with CML.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from dvc.api import DVCFileSystem
from dvc.exceptions import DvcException
from dvc_data.index import DataIndexError

from pipeline_lib.base.errors import PipelineError
from pipeline_lib.base.files import atomic_dir
from pipeline_lib.base.params import load_params
from pipeline_lib.measures.records import Records, read_records
from pipeline_lib.reporting.review import (
    ImageChange,
    MetricChange,
    changed_revisions,
    errors_section,
    figure_table,
    headline_section,
    image_rows,
    judge,
    metrics_table,
    moved_section,
    render_vega_lite,
    report_page,
    same_bytes,
)
from stages import common

WORKSPACE = "workspace"  # DVC's name for the revision on disk
HEADLINE = [
    ("reports/evaluate_single/metrics.json", "accuracy"),
    ("reports/evaluate_single/metrics.json", "mean_iou"),
    ("reports/evaluate_multi/metrics.json", "map"),
    ("reports/evaluate_multi/metrics.json", "map_iou_0.3"),
    ("reports/evaluate_multi/metrics.json", "coco_map"),
    ("reports/evaluate_finetune/metrics.json", "map"),
    ("reports/evaluate_finetune/metrics.json", "gain"),
]


EVALUATIONS = ("multi", "single")  # evaluate_<kind>: their records and headline figures


def main(
    base: Annotated[
        str, typer.Option(help="Revision(s) to compare with, comma-separated.")
    ] = "main",
    new: Annotated[str, typer.Option(help="Revision(s) compared, comma-separated.")] = WORKSPACE,
    out: Annotated[Path, typer.Option(help="Folder of report.md and its images.")] = Path("report"),
) -> None:
    """Compare NEW with BASE: params, judged headline figures, errors, metrics, plots, figures."""
    with common.clean_errors():
        groups = (_revisions(base), _revisions(new))
        revs = (groups[0][0], groups[1][0])
        params = json.loads(dvc("params", "diff", *_diff_args(revs), "--json"))
        metrics = json.loads(dvc("metrics", "diff", *_diff_args(revs), "--json"))
        with tempfile.TemporaryDirectory() as tmp, atomic_dir(out) as folder:
            plots = json.loads(dvc("plots", "diff", *_diff_args(revs), "--json", "-o", tmp))
            title = " → ".join(_group_name(group) for group in groups)
            sections = [f"# Pipeline report: `{title}`", params_section(params, revs)]
            judged, shown = judged_sections(groups, Path(tmp), folder)
            sections += judged
            sections.append(metrics_section(metrics, revs, shown))
            sections.append(plots_section(plots["data"], folder))
            sections.append(figures_section(plots["data"], revs, folder))
            text = "\n\n".join(sections) + "\n"
            (folder / "report.md").write_text(text, encoding="utf-8")
            page = report_page(text, f"Pipeline report: {title}")
            (folder / "report.html").write_text(page, encoding="utf-8")
    typer.echo(f"{out / 'report.md'}: {title}")


def judged_sections(
    groups: tuple[list[str], list[str]], tmp: Path, folder: Path
) -> tuple[list[str], set[str]]:
    """'Headline figures' (judged), 'Where the detector errs' and 'Images the change moved',
    from the per-image records of every run of both sides; and the metrics files they show."""
    rows, notes, found, shown = [], [], {}, set()
    for kind in EVALUATIONS:
        missing: list[str] = []
        sides = [[records_of(rev, kind, tmp, missing) for rev in group] for group in groups]
        if missing:
            notes += missing
            continue
        ev = load_params("params.yaml").eval  # how many draws, at which confidence
        rows += [
            (f"reports/evaluate_{kind}", j) for j in judge(*sides, ev.bootstrap, ev.confidence)
        ]
        found[kind] = sides
        shown.add(f"reports/evaluate_{kind}/intervals.json")
    revs = (groups[0][0], groups[1][0])
    sections = [headline_section(rows, notes, revs, (len(groups[0]), len(groups[1])))]
    if "multi" in found:
        sections.append(errors_section(*found["multi"], revs))
        sections.append(moved_section(*(side[0] for side in found["multi"]), revs, folder))
        shown.add("reports/evaluate_multi/errors.json")
    return sections, shown


def records_of(rev: str, kind: str, tmp: Path, missing: list[str]) -> Records | None:
    """The per-image records of evaluate_KIND at `rev` (the workspace's: on disk), or None with
    the reason appended to `missing`."""
    path = f"reports/evaluate_{kind}/records"
    folder = Path(path)
    if rev != WORKSPACE:
        folder = tmp / "records" / re.sub(r"[^\w.-]", "_", f"{rev}_{kind}")
        try:
            DVCFileSystem(".", rev=rev).get(path, str(folder), recursive=True)
        except FileNotFoundError:
            missing.append(f"`{rev}` has no {path} (made before the report could judge changes)")
            return None
        except (DvcException, DataIndexError):
            missing.append(f"`{rev}`'s {path} is not in this DVC cache (`dvc pull` it first)")
            return None
    elif not folder.is_dir():
        missing.append(f"the workspace has no {path} (`dvc repro` first)")
        return None
    return read_records(folder)


def _group_name(group: list[str]) -> str:
    """'main', or 'cmp-abc-base-s0 and 2 more runs' for a group."""
    more = len(group) - 1
    return group[0] + (f" and {more} more run{'s' if more > 1 else ''}" if more else "")


def _revisions(text: str) -> list[str]:
    revs = [rev.strip() for rev in text.split(",") if rev.strip()]
    if not revs:
        raise PipelineError(f"no revision in {text!r}")
    return revs


def _diff_args(revs: tuple[str, str]) -> list[str]:
    """DVC's diff arguments: `a` for a against the workspace, `a b` for two revisions."""
    return [revs[0]] if revs[1] == WORKSPACE else list(revs)


def params_section(diff: dict, revs: tuple[str, str]) -> str:
    rows = [
        f"| {path} | {key} | {_text(v['old'])} | {_text(v['new'])} |"
        for path, keys in diff.items()
        for key, v in sorted(keys.items())
    ]
    if not rows:
        return "## Params\n\nNo param changed."
    head = f"| file | param | {revs[0]} | {revs[1]} |\n|---|---|---|---|"
    return "## Params\n\n" + "\n".join([head, *rows])


def metrics_section(diff: dict, revs: tuple[str, str], shown: set[str]) -> str:
    """DVC's diff of the metrics files, but those the judged sections showed (`shown`)."""
    changes = [
        MetricChange(path, key, v.get("old"), v.get("new"))
        for path, keys in diff.items()
        for key, v in keys.items()
        if path not in shown
    ]
    if not changes:
        return "## Metrics\n\nNo metric changed."
    return "## Metrics\n\n" + metrics_table(changes, HEADLINE, revs)


def plots_section(plots: dict, folder: Path) -> str:
    """Render each Vega plot whose data changed into folder/plots/."""
    images = []
    for name, entries in plots.items():
        for entry in entries:
            if entry["type"] != "vega" or not changed_revisions(entry["content"]["data"]["values"]):
                continue
            path = folder / "plots" / f"{name}.png"
            path.parent.mkdir(exist_ok=True)
            render_vega_lite(entry["content"], path)
            images.append((name, f"plots/{path.name}"))
    return "## Plots\n\n" + (image_rows(images) if images else "No plot data changed.")


def figures_section(plots: dict, revs: tuple[str, str], folder: Path) -> str:
    """Copy the two versions of each changed PNG figure into folder/figures/."""
    changes = []
    for name, entries in plots.items():
        images = {e["revisions"][0]: Path(e["url"]) for e in entries if e["type"] == "image"}
        old, new = images.get(revs[0]), images.get(revs[1])
        if not images or same_bytes(old, new):
            continue
        copies = []
        for rev, source in zip(revs, (old, new), strict=True):
            copy = None
            if source is not None:
                copy = folder / "figures" / re.sub(r"[^\w.-]", "_", f"{rev}_{name}")
                copy.parent.mkdir(exist_ok=True)
                shutil.copyfile(source, copy)
            copies.append(copy)
        changes.append(ImageChange(name, *copies))
    if not changes:
        return "## Figures\n\nNo figure changed."
    return "## Figures\n\n" + figure_table(
        changes, revs, lambda p: p.relative_to(folder).as_posix()
    )


def dvc(*args: str) -> str:
    """stdout of `dvc ARGS`; a clear error with DVC's message when it fails."""
    try:
        done = subprocess.run(["dvc", *args], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise PipelineError("the `dvc` command is not on PATH (make install)") from None
    if done.returncode:
        message = done.stderr.strip() or done.stdout.strip()
        raise PipelineError(f"`dvc {' '.join(args)}` failed: {message}")
    return done.stdout


def _text(value) -> str:
    return "—" if value is None else str(value)


if __name__ == "__main__":
    common.main(lambda: typer.run(main))
