"""Write a pull-request report: what a change does to params, metrics and plots.

    python -m stages.report --base main              # -> report/report.md and its images
    make report BASE=main

Compares the workspace (the pipeline's outputs as they are now, e.g. after `dvc repro` or
`dvc exp apply`) with the committed outputs of `--base` and writes, under `--out`:
- report.md: the params that changed, the metrics that changed (headline figures first:
  accuracy, mean IoU, mAP), every Vega plot whose data changed and every PNG figure that changed;
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

from pipeline_lib.errors import PipelineError
from pipeline_lib.files import atomic_dir
from pipeline_lib.review import (
    ImageChange,
    MetricChange,
    changed_revisions,
    figure_table,
    image_rows,
    metrics_table,
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


def main(
    base: Annotated[str, typer.Option(help="The git revision to compare with.")] = "main",
    out: Annotated[Path, typer.Option(help="Folder of report.md and its images.")] = Path("report"),
) -> None:
    """Compare the workspace with BASE: params, metrics, changed plots and figures."""
    with common.clean_errors():
        revs = (base, WORKSPACE)
        params = json.loads(dvc("params", "diff", base, "--json"))
        metrics = json.loads(dvc("metrics", "diff", base, "--json"))
        with tempfile.TemporaryDirectory() as tmp, atomic_dir(out) as folder:
            plots = json.loads(dvc("plots", "diff", base, "--json", "-o", tmp))["data"]
            sections = [f"# Pipeline report: `{base}` → this change", params_section(params, revs)]
            sections.append(metrics_section(metrics, revs))
            sections.append(plots_section(plots, folder))
            sections.append(figures_section(plots, revs, folder))
            text = "\n\n".join(sections) + "\n"
            (folder / "report.md").write_text(text, encoding="utf-8")
            page = report_page(text, f"Pipeline report: {base} -> {WORKSPACE}")
            (folder / "report.html").write_text(page, encoding="utf-8")
    typer.echo(f"{out / 'report.md'}: {base} -> {WORKSPACE}")


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


def metrics_section(diff: dict, revs: tuple[str, str]) -> str:
    changes = [
        MetricChange(path, key, v.get("old"), v.get("new"))
        for path, keys in diff.items()
        for key, v in keys.items()
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
    typer.run(main)
