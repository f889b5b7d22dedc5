"""Write the HTML template that makes `dvc plots show` / `dvc plots diff` pages work offline.

    python -m stages.plots_template            # -> .dvc/plots_template.html (committed)

DVC fills a page template's `{plot_divs}` with one `vegaEmbed(...)` call per plot, and its
`{scripts}` with <script src> tags that fetch Vega, Vega-Lite and Vega-Embed from a CDN: offline
(or in a CI artifact viewer) every plot stays empty. This template has no `{scripts}`
placeholder, so those tags are dropped, and carries the three libraries inline instead, bundled
by the `vl-convert-python` package (`javascript_bundle`). `.dvc/config` names it
(`plots.html_template`); re-run this command after upgrading vl-convert-python.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline_lib.base.files import atomic_file
from pipeline_lib.reporting.review import VEGA_LITE
from stages import common

TEMPLATE_PATH = Path(".dvc/plots_template.html")

PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC plots</title>
    <!-- Vega @VEGA@, Vega-Lite @VL@, Vega-Embed @EMBED@, inline (no network needed); written
         by `python -m stages.plots_template` -->
    <script type="text/javascript">
@BUNDLE@
    </script>
    <style>
        body { font-family: sans-serif; }
        table { border-spacing: 15px; }
        img { max-width: 100%; }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def page() -> str:
    """The template: DVC's placeholders `{refresh_tag}` and `{plot_divs}`, no `{scripts}`."""
    import vl_convert

    bundle = vl_convert.javascript_bundle(vl_version=VEGA_LITE)
    if "</script" in bundle.lower():  # would end the inline script early
        raise RuntimeError("the Vega bundle contains '</script': cannot inline it")
    parts = {
        "@VEGA@": vl_convert.get_vega_version(),
        "@VL@": VEGA_LITE,
        "@EMBED@": vl_convert.get_vega_embed_version(),
        "@BUNDLE@": bundle,  # last: the bundle's text is not searched for tokens
    }
    text = PAGE
    for token, value in parts.items():
        text = text.replace(token, value, 1)
    return text


def main(
    out: Annotated[Path, typer.Option(help="Where to write the template.")] = TEMPLATE_PATH,
) -> None:
    """Write the offline plots page template (DVC config `plots.html_template`)."""
    with atomic_file(out) as tmp:
        tmp.write_text(page(), encoding="utf-8")
    typer.echo(f"{out}: {out.stat().st_size / 1e6:.1f} MB (Vega, Vega-Lite, Vega-Embed inline)")


if __name__ == "__main__":
    common.main(lambda: typer.run(main))
