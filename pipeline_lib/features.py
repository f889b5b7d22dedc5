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
import os
import shutil
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from safetensors import SafetensorError, safe_open
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as F
from tqdm import tqdm

from pipeline_lib.backbones import Backbone, pack_levels, run_levels
from pipeline_lib.distributed import ONE_PROCESS, Ranks, all_gather, batch_share, gather_bytes
from pipeline_lib.errors import PipelineError
from pipeline_lib.geometry import ImageSpec, transform_pixels
from pipeline_lib.params import BackboneParams, ParamsError

STORE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
PRECISIONS = ("float32", "bfloat16")  # the backbone's compute precision, see pick_precision
_SAFETENSORS_DTYPES = {torch.float16: "F16", torch.float32: "F32"}
_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}


class ImageError(PipelineError, ValueError):
    """An image cannot be decoded (the message names the file)."""


def load_rgb(path: Path, at_least: int | None = None) -> Image.Image:
    """Decode an image fully as RGB, or raise `ImageError` naming the file.

    Greyscale, palette, CMYK and alpha images are converted to RGB. A file whose content does not
    match its extension (a PNG named .jpg) and PIL's decompression-bomb guard are refused. With
    `at_least`, a JPEG at least twice that size each way is decoded at 1/2, 1/4 or 1/8 of its
    size, never below `at_least` pixels each way (DCT scaling, PIL's `draft`): a 2000 x 1500
    photo for 224 x 224 in 5 ms instead of 13 (benchmarks/extract.py); smaller images and other
    formats are decoded as they are.
    """
    try:
        with Image.open(path) as image:
            expected = _FORMATS.get(path.suffix.lower())
            found = "JPEG" if image.format == "MPO" else image.format  # multi-picture JPEG
            if expected and found != expected:
                raise ImageError(f"{path}: image: a {image.format} file named {path.suffix}")
            if at_least:
                image.draft(None, (at_least, at_least))  # no-op unless a JPEG >= 2x each way
            return image.convert("RGB")  # convert() decodes everything: truncation shows here
    except FileNotFoundError:
        raise ImageError(f"{path}: image: missing (was it deleted since prepare ran?)") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError) as exc:
        raise ImageError(f"{path}: image: cannot decode ({exc})") from None


def load_image_tensor(path: Path, mode: str, size: int) -> torch.Tensor:
    """An image file after the image mode as a uint8 (3, S, S) tensor (`load_rgb`'s errors).

    PIL decodes (under `shrink`, large JPEGs at a lower scale: `load_rgb`'s `at_least`),
    torchvision's uint8 kernel resizes (`geometry.transform_pixels`): on VOC photos at 224 that
    is ~1.7 ms an image where PIL's own resize made it ~2.4 ms (benchmarks/extract.py).
    torchvision's `decode_jpeg` gives the same pixels as PIL (all 765 VOC photos compared) about
    0.3 ms sooner, but is deprecated since torchvision 0.29, and skips PIL's checks.
    """
    image = load_rgb(path, at_least=size if mode == "shrink" else None)
    return transform_pixels(F.pil_to_tensor(image), mode, size).contiguous()


def check_stackable(mode: str) -> None:
    """Extraction needs one size for all images: refuse image.mode none."""
    if mode == "none":
        raise ParamsError(
            "image.mode: none keeps every image's own size, so features cannot be stacked into "
            "one tensor; use shrink or crop for extraction"
        )


class ImageFolder(Dataset):
    """Items are (index, uint8 (3, S, S) tensor or None, error message or None); `flipped`: the
    S x S image flipped left to right."""

    def __init__(self, paths: list[Path], mode: str, size: int, flipped: bool = False):
        check_stackable(mode)
        self.paths, self.mode, self.size, self.flipped = paths, mode, size, flipped

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            pixels = load_image_tensor(self.paths[index], self.mode, self.size)
        except ImageError as exc:
            return index, None, str(exc)
        return index, pixels.flip(-1) if self.flipped else pixels, None


def _collate(items):
    good = [item for item in items if item[1] is not None]
    bad = [(index, error) for index, _, error in items if error is not None]
    batch = torch.stack([tensor for _, tensor, _ in good]) if good else None
    return [index for index, _, _ in good], batch, bad


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


def pick_workers(workers: int | str, device: torch.device) -> int:
    """Image-decoding processes: `auto` is 1 on CPU (the model needs the cores) and every core,
    up to 16, beside a GPU."""
    if workers == "auto":
        return 1 if device.type == "cpu" else min(16, os.cpu_count() or 1)
    return int(workers)


def pick_device(device: str, key: str) -> torch.device:
    """`device` (auto | cpu | cuda) as torch's: `auto` takes the GPU when there is one. `key`
    names where the value came from (`train.device`, `--device`) in the error for a GPU that is
    not there."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ParamsError(f"{key}: cuda, but torch sees no GPU (use auto or cpu)")
    return torch.device(device)


def native_bfloat16(device: torch.device) -> bool:
    """Whether `device` computes in bfloat16 natively: a CPU with AVX-512 BF16 or AMX tiles, or a
    GPU with bfloat16 arithmetic (compute capability 8.0 on, not emulated)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False  # other devices: float32 unless bfloat16 is asked for


def pick_precision(precision: str, device: torch.device) -> str:
    """The backbone's compute precision (one of PRECISIONS): `auto` is bfloat16 where
    `native_bfloat16(device)`, float32 elsewhere; float32 and bfloat16 are kept as asked (bfloat16
    without native support is emulated: slower than float32)."""
    if precision == "auto":
        return "bfloat16" if native_bfloat16(device) else "float32"
    if precision not in PRECISIONS:
        raise ParamsError(f"backbone.precision: {precision!r}, not auto, float32 or bfloat16")
    return precision


def prepare_model(
    backbone: Backbone,
    device: torch.device,
    compile: bool = False,
    batch_size: int | None = None,
    precision: str = "float32",
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function mapping a uint8 (B, 3, S, S) batch on `device` to float32 features (with a
    fine level, both levels packed by `backbones.pack_levels`), computed in `precision` (float32,
    or bfloat16 autocast: convolutions and matmuls in bfloat16, the rest as autocast decides).

    Moves `backbone.module` to `device` and to channels_last in place: oneDNN's fast layout on a
    CPU, the tensor cores' on a GPU (Lite0 at 448 in bfloat16 on an H200, model only: 5,614
    images/s against 3,614 in NCHW). With `compile`,
    the model goes through torch.compile (inductor, frozen weights, static shapes). Batches smaller
    than `batch_size` are padded to it (with zeros, cut off again): compiled, the last batch does
    not trigger a second compile; eager, every batch runs the same kernels. oneDNN splits a small
    batch's sums across threads (measured on 2 cores, Lite0 at 224 and 448: batches of 2 and 8
    end in other last bits with 1 thread than with 2, batches of 16 do not), so an unpadded last
    batch would differ between a one-process run and the ranks of a torchrun one, which have
    fewer threads each; on more cores a batch needs to be larger for the same guarantee.
    """
    model = backbone.module.to(device).eval().to(memory_format=torch.channels_last)
    mean = torch.tensor(backbone.mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(backbone.std, device=device).view(1, 3, 1, 1) * 255
    if backbone.fine_layer:  # two levels, packed into one tensor

        def model(x: torch.Tensor, trunk: torch.nn.Module = model) -> torch.Tensor:
            return pack_levels(*run_levels(trunk, backbone.fine_layer, x))

    run = torch.compile(model, dynamic=False, options={"freezing": True}) if compile else model

    def call(x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if batch_size and rows < batch_size:
            x = torch.cat([x, x.new_zeros((batch_size - rows, *x.shape[1:]))])
        if not compile:
            return run(x)[:rows]
        try:
            return run(x)[:rows]
        except torch._dynamo.exc.BackendCompilerFailed as error:
            cause = error.inner_exception  # the error's own first line names only the backend
            first = (str(cause).splitlines() or [""])[0][:200]
            raise PipelineError(
                f"backbone.compile: torch.compile failed for {backbone.name} "
                f"({type(cause).__name__}: {first}); set backbone.compile: false"
            ) from error

    bf16 = pick_precision(precision, device) == "bfloat16"

    def autocast():  # entered only for bfloat16: not every device has an autocast
        return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    @torch.inference_mode()
    def forward(batch: torch.Tensor) -> torch.Tensor:
        x = ((batch.float() - mean) / std).contiguous(memory_format=torch.channels_last)
        with autocast():
            return call(x).float()

    return forward


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
        torch.set_num_threads(ranks.threads())
    workers = pick_workers(settings.workers, device)
    share = batch_share(len(images), settings.batch_size, ranks)
    ids = list(images)[share.start : share.stop]
    if not ranks.main:
        progress = None  # one progress bar: rank 0's
    loader = DataLoader(
        ImageFolder([images[i] for i in ids], spec.mode, spec.size, flipped),
        batch_size=settings.batch_size,
        num_workers=workers,
        collate_fn=_collate,
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
            _write_safetensors(out_path, raw, (len(rows.kept), *rows.shape), dtype, metadata)
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


def _write_safetensors(
    path: Path, raw: Path, shape: tuple[int, ...], dtype: torch.dtype, metadata: dict[str, str]
) -> None:
    """Write a one-tensor safetensors file whose data is the bytes of the file `raw`.

    safetensors' own `save_file` needs the whole tensor in memory; this writes the same documented
    layout (8-byte little-endian header length, JSON header, raw row-major data) by streaming the
    rows already on disk, so memory stays flat. Tests read the result with `safe_open`.
    """
    nbytes = raw.stat().st_size
    expected = int(np.prod(shape)) * torch.tensor([], dtype=dtype).element_size()
    if nbytes != expected:
        raise RuntimeError(f"{raw}: {nbytes} bytes written, {expected} expected for {shape}")
    header = {
        "__metadata__": metadata,
        "features": {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [0, nbytes],
        },
    }
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # align the data to 8 bytes, as safetensors does
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as out, open(raw, "rb") as rows:
            out.write(struct.pack("<Q", len(text)))
            out.write(text)
            shutil.copyfileobj(rows, out, length=16 << 20)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class FeatureRows:
    """The rows of a feature file, read from disk when asked for: `rows[index]` (an int, a slice
    or a 1-D tensor of row numbers) is a (n, C, H, W) tensor in the store dtype; nothing else is
    held in memory. `select(mask_or_rows)` is a view on some rows (still on disk).

    Reads are `os.pread`s at the rows' byte offsets (safetensors data is row-major after its
    header): memory stays at one batch however large the file. (Not `mmap`: pages a map has
    touched count in the process's resident memory until the kernel evicts them; the page cache
    that serves these reads is the kernel's, given back under pressure.)
    """

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: torch.dtype, offset: int):
        self.path, self.shape, self.dtype, self.offset = path, torch.Size(shape), dtype, offset
        self.row_bytes = int(np.prod(shape[1:])) * torch.tensor([], dtype=dtype).element_size()
        self.rows: torch.Tensor | None = None  # the file rows of this view (None: all, in order)

    def __len__(self) -> int:
        return self.shape[0]

    def select(self, which: torch.Tensor) -> FeatureRows:
        """The rows where the bool mask `which` is true, or the rows numbered in `which`."""
        numbers = torch.nonzero(which).flatten() if which.dtype == torch.bool else which.long()
        view = FeatureRows(self.path, (len(numbers), *self.shape[1:]), self.dtype, self.offset)
        view.rows = numbers if self.rows is None else self.rows[numbers]
        return view

    def __getitem__(self, index) -> torch.Tensor:
        # Through arange: an int, a slice, row numbers (negative ones too) or a mask alike.
        numbers = torch.arange(len(self))[index].reshape(-1)
        if self.rows is not None:
            numbers = self.rows[numbers]
        out = np.empty((len(numbers), self.row_bytes), dtype=np.uint8)
        with open(self.path, "rb") as handle:
            fd = handle.fileno()
            for i, row in enumerate(numbers.tolist()):
                start = self.offset + row * self.row_bytes
                if os.preadv(fd, [memoryview(out[i])], start) != self.row_bytes:
                    raise PipelineError(f"{self.path}: row {row} is cut short (file truncated?)")
        tensor = torch.from_numpy(out).view(self.dtype).reshape(len(numbers), *self.shape[1:])
        return tensor[0] if isinstance(index, int) else tensor


@dataclass
class Features:
    features: torch.Tensor | FeatureRows  # (N, C, H, W) in the store dtype
    image_ids: list[str]
    metadata: dict


def read_features(path: str | Path, lazy: bool = False) -> Features:
    """Load a feature file written by `extract_features`; with `lazy`, its rows stay on disk
    and are read batch by batch (`FeatureRows`)."""
    if not Path(path).is_file():
        raise PipelineError(
            f"{path}: no feature file; run the extract stage first (dvc repro extract)"
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            if lazy:
                tensor = _lazy_rows(Path(path), handle.get_slice("features"))
            else:
                tensor = handle.get_tensor("features")
    except (SafetensorError, OSError, ValueError) as error:  # truncated, a pickle, another format
        raise PipelineError(
            f"{path}: not a readable feature file ({error}); run dvc repro extract"
        ) from None
    try:
        image_ids = json.loads(metadata.pop("image_ids"))
        metadata["backbone"] = json.loads(metadata["backbone"])
    except (KeyError, ValueError) as error:
        raise PipelineError(
            f"{path}: a safetensors file, but not features of this pipeline (metadata {error})"
        ) from None
    if len(image_ids) != tensor.shape[0]:
        raise PipelineError(f"{path}: {tensor.shape[0]} rows but {len(image_ids)} image ids")
    return Features(tensor, image_ids, metadata)


def _lazy_rows(path: Path, view) -> FeatureRows:
    """`FeatureRows` of the file's `features` tensor (`view`: safetensors' slice of it), its data
    offset read from the header (8-byte little-endian length, JSON, then the data). safe_open has
    checked the header already: every tensor's bytes match its shape and dtype, and the file
    holds them all (a truncated file is refused there)."""
    dtype = {"F16": torch.float16, "F32": torch.float32}.get(view.get_dtype())
    if dtype is None:
        raise ValueError(f"features in {view.get_dtype()}, not float16 / float32")
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    start, _ = header["features"]["data_offsets"]
    return FeatureRows(path, tuple(view.get_shape()), dtype, 8 + length + start)
