"""Stage `extract`: backbone features for every prepared image, cached in data/features.

    python -m stages.extract [--params params.yaml]
    torchrun --nproc-per-node N -m stages.extract      # N processes (GPUs), or --nnodes machines

Writes
- data/features/<split>.safetensors: `features` (N, C, H, W) in backbone.store_dtype, with the image
  ids in row order and the backbone description in the metadata (see
  pipeline_lib/features/featurefiles.py);
  with backbone.hflip also train_flipped.safetensors, the training images flipped left to right,
- data/features/features.json: backbone, layer, weights, normalisation, compute precision (the
  resolved backbone.precision), image mode and size, store dtype, and per split the shape and file,
- reports/extract/report.json: device, precision, processes; per split the wall time, images/s,
  seconds by part (worker start-up, waiting for decoded images, backbone, writing) and skipped
  images.

With backbone.processes > 1 the stage starts itself again under torchrun (one machine, that many
processes), so `dvc repro` needs nothing else; under torchrun each process extracts its share of
the images and rank 0 writes the same files one process writes (pipeline_lib/base/distributed.py).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
import typer

from pipeline_lib.base import distributed
from pipeline_lib.base.files import atomic_dir, write_json
from pipeline_lib.base.params import Params, load_params
from pipeline_lib.boxes.geometry import ImageSpec
from pipeline_lib.data.tables import read_prepared
from pipeline_lib.features.backbones import load_backbone
from pipeline_lib.features.extraction import ExtractSettings, extract_features
from pipeline_lib.features.images import check_stackable
from stages import common
from stages.common import (
    EXTRACT_REPORTS,
    FEATURES_DIR,
    PARAMS_OPTION,
    PREPARED_DIR,
    clean_errors,
    restart_under_torchrun,
    warn,
)

app = typer.Typer(add_completion=False)


@app.command()
def main(params_file: Path = PARAMS_OPTION) -> None:
    """Run backbone.name over data/prepared's images under image.mode / image.size."""
    with clean_errors():
        params = load_params(params_file)
        bb, spec = params.backbone, ImageSpec(params.image.mode, params.image.size)
        check_stackable(spec.mode)
        restart_under_torchrun(bb.processes, "stages.extract", "--params", str(params_file))
        ranks = distributed.start()
        try:
            extract(params, spec, ranks)
        finally:
            distributed.stop()


def extract(params: Params, spec: ImageSpec, ranks: distributed.Ranks) -> None:
    """Every split's features into data/features (rank 0 writes; other ranks send their rows)."""
    bb = params.backbone
    settings = ExtractSettings.from_params(bb, params.data.on_error)  # the device resolved
    device = settings.device
    precision = settings.precision  # resolved: float32 | bfloat16
    prepared = read_prepared(PREPARED_DIR)
    backbone = load_backbone(bb.name, bb.layer, bb.weights, bb.fine_layer)
    description = {**backbone.describe(), "precision": precision, "image_mode": spec.mode}
    description |= {"image_size": spec.size, "store_dtype": bb.store_dtype, "splits": {}}
    report = {"device": str(device), "precision": precision, "processes": ranks.world}
    report |= {"torch": torch.__version__, "splits": {}}
    jobs = [(split, images, False) for split, images in prepared.split_files()]
    if bb.hflip:  # the training images flipped left to right, for train.hflip
        jobs += [(f"{s}_flipped", images, True) for s, images, _ in jobs if s == "train"]
    with output_folder(ranks) as out:
        for split, images, flipped in jobs:
            file = f"{split}.safetensors"
            label = f"extract {split}" + (f" (rank 0 of {ranks.world})" if ranks.world > 1 else "")
            result = extract_features(
                backbone, images, out / file, spec, settings, label, ranks, flipped
            )
            description["splits"][split] = {"file": file, "shape": list(result.shape)}
            report["splits"][split] = result.report()
            if ranks.main:
                for skip in result.skipped:
                    warn(f"skipped {skip['reason']}")
                typer.echo(
                    f"{split}: {len(result.image_ids)} images -> {tuple(result.shape)} "
                    f"{bb.store_dtype} in {result.seconds:.1f} s ({result.images_per_second:.1f} "
                    f"images/s on {device} x {ranks.world} in {precision}), "
                    f"{len(result.skipped)} skipped; seconds by part: "
                    + ", ".join(f"{part} {t:.1f}" for part, t in result.parts.items())
                )
        write_json(out / "features.json", description)
    if ranks.main:
        write_json(EXTRACT_REPORTS / "report.json", report)


@contextlib.contextmanager
def output_folder(ranks: distributed.Ranks) -> Iterator[Path]:
    """Rank 0: data/features, replaced once complete; other ranks: a scratch folder."""
    if ranks.main:
        with atomic_dir(FEATURES_DIR) as out:
            yield out
    else:
        with tempfile.TemporaryDirectory(prefix="extract_rank") as scratch:
            yield Path(scratch)


if __name__ == "__main__":
    common.main(app)
