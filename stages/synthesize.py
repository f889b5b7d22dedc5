"""Stage `synthesize`: write the embedded synthetic dataset (VOCdevkit layout) to data/synthetic.

python -m stages.synthesize [--params params.yaml] [--workers 2]
"""

from __future__ import annotations

import os
from pathlib import Path

import typer

from pipeline_lib.base.params import load_params
from pipeline_lib.data.synthetic import generate_dataset
from stages import common
from stages.common import PARAMS_OPTION, SYNTHETIC_DATASET, clean_errors

app = typer.Typer(add_completion=False)


@app.command()
def main(
    params_file: Path = PARAMS_OPTION,
    workers: int = typer.Option(os.cpu_count() or 1, help="Processes drawing scenes."),
) -> None:
    """Generate data.synthetic.n_train + n_val scenes with their VOC annotations."""
    with clean_errors():
        synthetic = load_params(params_file).data.synthetic
        generate_dataset(SYNTHETIC_DATASET, synthetic, workers=workers)
    typer.echo(f"wrote {synthetic.n_train + synthetic.n_val} scenes to {SYNTHETIC_DATASET}")


if __name__ == "__main__":
    common.main(app)
