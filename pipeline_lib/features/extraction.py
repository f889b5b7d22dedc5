"""Backbone features for every image, computed once and cached as safetensors files.

A feature file holds one tensor `features` (N, C, H, W) in the store dtype, with the image ids in
row order as JSON in its metadata (`image_ids`), next to the backbone description. Files are
streamed to disk batch by batch, so memory does not grow with the number of images.

Speed: images are decoded and transformed in DataLoader worker processes (uint8 tensors, so little
to copy) while the main process runs the model in channels_last under inference mode: on CPU with
all cores; on a GPU fed from pinned memory, each batch's features copied back while the next batch
computes (`_ToHost`). `ExtractResult.parts` says where the time went (worker start-up, waiting for
decoded images, the backbone, writing). The model runs in float32 or under
bfloat16 autocast (`pick_precision`: `auto` takes bfloat16 where the hardware computes it natively,
about 2x faster on CPUs with AVX-512 BF16); the precision is recorded in the file's backbone
description, so `predict` runs the backbone the same way. Opt-in `compile=True`
runs the model through torch.compile with weight freezing (measured on 2 CPU cores, model only:
+35-50 % images/s for EfficientNet-Lite0, 0-20 % for resnet18, after 15-30 s of compilation).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline_lib.base.distributed import ONE_PROCESS, Ranks, all_gather, batch_share, gather_bytes
from pipeline_lib.base.errors import PipelineError
from pipeline_lib.base.params import BackboneParams
from pipeline_lib.boxes.geometry import ImageSpec
from pipeline_lib.features.backbones import Backbone
from pipeline_lib.features.devices import pick_device, pick_precision, pick_workers, prepare_model
from pipeline_lib.features.featurefiles import STORE_DTYPES, write_feature_file
from pipeline_lib.features.images import ImageError, ImageFolder, collate_decoded


@dataclass
class ExtractResult:
    image_ids: list[str]
    shape: tuple[int, ...]
    seconds: float
    skipped: list[dict] = field(default_factory=list)  # {"image_id", "reason"}
    parts: dict[str, float] = field(default_factory=dict)  # seconds, see `Clock`

    @property
    def images_per_second(self) -> float:
        return (len(self.image_ids) + len(self.skipped)) / max(self.seconds, 1e-9)

    def report(self) -> dict:
        """One split's entry of reports/extract/report.json."""
        return {
            "images": len(self.image_ids),
            "skipped": len(self.skipped),
            "seconds": round(self.seconds, 2),
            "images_per_second": round(self.images_per_second, 1),
            "seconds_by_part": {part: round(t, 2) for part, t in self.parts.items()},
            "skipped_images": self.skipped,
        }


@dataclass(frozen=True)
class ExtractSettings:
    """How `extract_features` runs (params backbone.* and data.on_error)."""

    store_dtype: str = "float16"  # see STORE_DTYPES
    batch_size: int = 32
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "float32"  # auto | float32 | bfloat16, see pick_precision
    compile: bool = False  # torch.compile the backbone
    workers: int | str = "auto"  # image-decoding processes, see pick_workers
    on_error: str = "raise"  # raise | skip an image that cannot be decoded

    @classmethod
    def from_params(cls, bb: BackboneParams, on_error: str) -> ExtractSettings:
        """The params' settings, backbone.device and backbone.precision resolved."""
        device = pick_device(bb.device, "backbone.device")
        precision = pick_precision(bb.precision, device)
        return cls(
            bb.store_dtype, bb.batch_size, device.type, precision, bb.compile, bb.workers, on_error
        )


def extract_features(
    backbone: Backbone,
    images: dict[str, Path],
    out_path: Path,
    spec: ImageSpec,
    settings: ExtractSettings = ExtractSettings(),
    progress: str | None = "extract",
    ranks: Ranks = ONE_PROCESS,
    flipped: bool = False,
) -> ExtractResult:
    """Run `backbone` over `images` (image id -> file, in row order) brought to `spec` (and with
    `flipped`, flipped left to right after it; the file's metadata says so), and stream the
    features to `out_path` (safetensors); `progress` labels the progress bar (None: none).

    With `on_error="raise"` the first undecodable image raises `ImageError`; with "skip" it is left
    out of the file (ids stay aligned with rows) and listed in the result. `out_path` appears only
    once complete.

    Under torchrun (`ranks` of a world > 1) every rank calls this with the same arguments and runs
    its `batch_share` of the images (on GPU: its own, cuda:LOCAL_RANK); the rows come back to rank
    0, which alone writes `out_path`: the same file as one process writes. Every rank returns the
    whole job's result.
    """
    device = pick_device(settings.device, "backbone.device")
    if device.type == "cuda" and ranks.world > 1:
        device = torch.device("cuda", ranks.local_rank)
    if device.type == "cpu":
        ranks.share_cpu()
    workers = pick_workers(settings.workers, device)
    share = batch_share(len(images), settings.batch_size, ranks)
    ids = list(images)[share.start : share.stop]
    if not ranks.main:
        progress = None  # one progress bar: rank 0's
    loader = DataLoader(
        ImageFolder([images[i] for i in ids], spec.mode, spec.size, flipped),
        batch_size=settings.batch_size,
        num_workers=workers,
        collate_fn=collate_decoded,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
    )
    precision = pick_precision(settings.precision, device)
    forward = prepare_model(backbone, device, settings.compile, settings.batch_size, precision)
    dtype = STORE_DTYPES[settings.store_dtype]

    def embed(batch: torch.Tensor) -> _ToHost:
        return _ToHost.start(forward(batch.to(device, non_blocking=True)).to(dtype))

    start = time.perf_counter()
    raw = out_path.with_name(f".{out_path.name}.rank{ranks.rank}.rows.tmp")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with tqdm(total=len(ids), desc=progress, unit="image", disable=progress is None) as bar:
            rows = _write_rows(raw, loader, embed, ids, settings.on_error, bar)
        rows = _merge_ranks(raw, rows, ranks)
        if rows.shape is None:
            raise ImageError(f"no image of {len(images)} could be decoded ({progress})")
        if ranks.main:
            metadata = {"image_ids": json.dumps(rows.kept), **_describe(backbone, spec, precision)}
            if flipped:
                metadata["flipped"] = "left-right"
            write_feature_file(out_path, raw, (len(rows.kept), *rows.shape), dtype, metadata)
    except OSError as error:  # disk full, quota, permissions: say where, keep nothing
        raise PipelineError(
            f"{out_path}: cannot write features ({error.strerror or error}); nothing was kept"
        ) from None
    finally:
        raw.unlink(missing_ok=True)
    seconds = time.perf_counter() - start
    shape = (len(rows.kept), *rows.shape)
    return ExtractResult(rows.kept, shape, seconds, rows.skipped, rows.clock.seconds)


@dataclass
class _ToHost:
    """A batch's features on their way to the CPU: `wait()` gives them once there. From a CUDA
    GPU the copy goes into pinned memory without blocking (`landed` marks its end in the GPU's
    stream), so the CPU writes the previous batch while the GPU computes this one; from other
    devices it is made at once."""

    features: torch.Tensor
    landed: torch.cuda.Event | None = None

    @classmethod
    def start(cls, features: torch.Tensor) -> _ToHost:
        if features.device.type != "cuda":
            return cls(features.cpu())
        host = features.to("cpu", non_blocking=True)  # pinned by torch for a non-blocking copy
        landed = torch.cuda.Event()
        landed.record()
        return cls(host, landed)

    def wait(self) -> torch.Tensor:
        if self.landed is not None:
            self.landed.synchronize()
        return self.features


class Clock:
    """Seconds the extraction loop spends per part: `startup` (until the first batch of decoded
    images: worker start-up and one batch's decoding), `decoding` (waiting for the next batch
    after that: decoding that does not keep up), `backbone` (running the model and waiting for
    its features on the CPU), `writing` (appending them to the file)."""

    PARTS = ("startup", "decoding", "backbone", "writing")

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(self.PARTS, 0.0)

    @contextmanager
    def timing(self, part: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[part] += time.perf_counter() - start

    def batches(self, loader: Iterable) -> Iterator:
        """The loader's batches, the wait for each counted as start-up (the first) or decoding."""
        part = "startup"
        with self.timing(part):
            batches = iter(loader)  # starts the workers
        while True:
            with self.timing(part):
                batch = next(batches, None)
            if batch is None:
                return
            part = "decoding"
            yield batch


@dataclass
class _Rows:
    kept: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    shape: tuple[int, ...] | None = None
    clock: Clock = field(default_factory=Clock)


def _write_rows(raw: Path, loader, embed, image_ids, on_error: str, bar) -> _Rows:
    """Features (`embed` of each batch) of every decodable image, appended to `raw` as
    row-major bytes. A batch is written once the next one has started (on a GPU: computes)."""
    rows = _Rows()
    clock = rows.clock

    def write(indices: list[int], copy: _ToHost) -> None:
        with clock.timing("backbone"):
            features = copy.wait()
        with clock.timing("writing"):
            sink.write(features.contiguous().numpy().tobytes())
        rows.shape = tuple(features.shape[1:])
        rows.kept.extend(image_ids[i] for i in indices)

    with open(raw, "wb") as sink:
        in_flight = None  # (indices, _ToHost) of the batch before
        for indices, batch, bad in clock.batches(loader):
            for index, error in bad:
                if on_error == "raise":
                    raise ImageError(error)
                rows.skipped.append({"image_id": image_ids[index], "reason": error})
            started = None
            if batch is not None:
                with clock.timing("backbone"):
                    started = (indices, embed(batch))
            if in_flight is not None:
                write(*in_flight)
            in_flight = started
            bar.update(len(indices) + len(bad))
        if in_flight is not None:
            write(*in_flight)
    return rows


def _merge_ranks(raw: Path, rows: _Rows, ranks: Ranks) -> _Rows:
    """Every rank's rows in rank order: ids and skips for all, the bytes appended to rank 0's
    `raw` (see distributed.gather_bytes)."""
    if ranks.world == 1:
        return rows
    parts = all_gather((rows.kept, rows.skipped, rows.shape, raw.stat().st_size), ranks)
    gather_bytes(raw, [size for *_, size in parts], ranks)
    merged = _Rows(clock=rows.clock)  # this rank's own timings
    for kept, skipped, shape, _ in parts:
        merged.kept += kept
        merged.skipped += skipped
        merged.shape = merged.shape or shape
    return merged


def _describe(backbone: Backbone, spec: ImageSpec, precision: str) -> dict[str, str]:
    return {
        "backbone": json.dumps(backbone.describe() | {"precision": precision}),
        "image_mode": spec.mode,
        "image_size": str(spec.size),
    }
