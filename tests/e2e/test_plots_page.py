"""The plots page of the committed reports, opened offline in a real headless browser: every
Vega plot is drawn (the libraries come inline from .dvc/plots_template.html, not from a CDN)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BROWSERS = ("chromium-headless-shell", "chromium", "google-chrome")
pytestmark = pytest.mark.e2e


def browser() -> str:
    for name in BROWSERS:
        if path := shutil.which(name):
            return path
    pytest.skip(
        "no headless browser: install Debian's chromium-headless-shell (apt-get install "
        "chromium-headless-shell) to render the plots page"
    )


def test_the_plots_page_draws_every_plot_without_a_network(tmp_path):
    chrome = browser()
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    out = tmp_path / "page"
    done = subprocess.run(
        ["dvc", "plots", "show", "-o", str(out)], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    page = (out / "index.html").read_text()
    assert not re.search(r"<script[^>]*\ssrc=", page)  # no script fetched: all inline
    plots = re.findall(r'<div id = "([^"]+)">\s*<script', page)  # DVC's Vega plot divs
    assert len(plots) >= 10, plots
    shown = subprocess.run(
        [
            chrome,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--host-resolver-rules=MAP * ~NOTFOUND",  # no network, whatever the machine has
            "--virtual-time-budget=10000",
            "--enable-logging=stderr",
            "--dump-dom",
            (out / "index.html").as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    dom, log = shown.stdout, shown.stderr
    assert "Uncaught" not in log and "is not defined" not in log, log[-2000:]
    for plot, following in zip(plots, [*plots[1:], None], strict=True):
        start = dom.index(f'<div id="{plot}"')
        end = dom.index(f'<div id="{following}"') if following else len(dom)
        drawn = dom[start:end]
        assert 'class="marks"' in drawn and 'class="mark-' in drawn, f"{plot} is empty"
        if plot.startswith("train_"):  # training curves: epochs 1.., legend train / val
            labels = set(re.findall(r">([^<>]+)</text>", drawn))
            assert {"epoch", "train", "val", "20"} <= labels, (plot, sorted(labels))


def test_the_committed_template_is_dvcs_page_without_cdn_scripts():
    config = (REPO / ".dvc/config").read_text()
    assert re.search(r"html_template\s*=\s*plots_template.html", config)
    template = (REPO / ".dvc/plots_template.html").read_text()
    assert "{plot_divs}" in template and "{refresh_tag}" in template
    assert "{scripts}" not in template  # where DVC would put its CDN <script src> tags
    assert "window.vegaEmbed=" in template and not re.search(r"<script[^>]*\ssrc=", template)
