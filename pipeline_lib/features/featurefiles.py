"""Feature files: one safetensors tensor `features` (N, C, H, W) in the store dtype, with the
image ids in row order (`image_ids`, JSON) and the backbone description in its metadata.

`write_feature_file` streams rows already on disk into that layout (memory stays flat);
`read_features` loads a file whole, or lazily as `FeatureRows` read from disk batch by batch.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from pipeline_lib.base.errors import PipelineError

STORE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


_SAFETENSORS_DTYPES = {torch.float16: "F16", torch.float32: "F32"}


def write_feature_file(
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
