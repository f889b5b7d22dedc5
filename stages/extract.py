"""Stage `extract`: backbone features for every prepared image, cached in data/features.

    python -m stages.extract [--params params.yaml]

Writes
- data/features/<split>.safetensors: `features` (N, C, H, W) in backbone.store_dtype, with the image
  ids in row order and the backbone description in the metadata (see pipeline_lib/features.py),
- data/features/features.json: backbone, layer, weights, normalisation, image mode and size, dtype,
  and per split the shape and file,
- reports/extract/report.json: device, wall time and images/s per split, skipped images and why.
"""

from __future__ import annotations

from pathlib import Path

import torch
import typer

from pipeline_lib.backbones import load_backbone
from pipeline_lib.features import check_mode, extract_features, pick_device
from pipeline_lib.files import atomic_dir, write_json
from pipeline_lib.params import ParamsError, load_params
from pipeline_lib.tables import read_prepared
from stages.common import EXTRACT_REPORTS, FEATURES_DIR, PARAMS_OPTION, PREPARED_DIR, clean_errors

app = typer.Typer(add_completion=False)


@app.command()
def main(params_file: Path = PARAMS_OPTION) -> None:
    """Run backbone.name over data/prepared's images under image.mode / image.size."""
    with clean_errors():
        params = load_params(params_file)
        bb, image = params.backbone, params.image
        check_mode(image.mode)
        device = pick_device(bb.device)
        prepared = read_prepared(PREPARED_DIR)
        dataset_dir = Path(prepared.info["dataset_dir"])
        if bb.fine_layer != "none" and image.size % 32:
            raise ParamsError(f"backbone.fine_layer: {bb.fine_layer} needs image.size to be a "
                              f"multiple of 32 (got {image.size})")  # fmt: skip
        backbone = load_backbone(bb.name, bb.layer, bb.weights, bb.fine_layer)
        description = {
            **backbone.describe(),
            "image_mode": image.mode,
            "image_size": image.size,
            "store_dtype": bb.store_dtype,
            "splits": {},
        }
        report = {"device": str(device), "torch": torch.__version__, "splits": {}}
        with atomic_dir(FEATURES_DIR) as out:
            for split, rows in prepared.images.groupby("split", sort=False):
                result = extract_features(
                    backbone,
                    [dataset_dir / p for p in rows["path"]],
                    rows["image_id"].tolist(),
                    out / f"{split}.safetensors",
                    image.mode,
                    image.size,
                    store_dtype=bb.store_dtype,
                    batch_size=bb.batch_size,
                    device=bb.device,
                    compile=bb.compile,
                    workers=bb.workers,
                    on_error=params.data.on_error,
                    description=f"extract {split}",
                )
                for skip in result.skipped:
                    typer.secho(f"warning: skipped {skip['reason']}", err=True, fg="yellow")
                description["splits"][split] = {
                    "file": f"{split}.safetensors",
                    "shape": list(result.shape),
                }
                report["splits"][split] = {
                    "images": len(result.image_ids),
                    "skipped": len(result.skipped),
                    "seconds": round(result.seconds, 2),
                    "images_per_second": round(result.images_per_second, 1),
                    "skipped_images": result.skipped,
                }
                typer.echo(
                    f"{split}: {len(result.image_ids)} images -> {tuple(result.shape)} "
                    f"{bb.store_dtype} in {result.seconds:.1f} s "
                    f"({result.images_per_second:.1f} images/s on {device}), "
                    f"{len(result.skipped)} skipped"
                )
            write_json(out / "features.json", description)
        write_json(EXTRACT_REPORTS / "report.json", report)


if __name__ == "__main__":
    app()
