"""Where and how a backbone runs: the device (`auto` takes the GPU), the image-decoding
processes, the compute precision (`auto`: bfloat16 where the hardware computes it natively), and
the model function itself (`prepare_model`: channels_last, inference mode, bfloat16 autocast,
optional torch.compile with frozen weights).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import nullcontext

import torch

from pipeline_lib.base.errors import PipelineError
from pipeline_lib.base.params import ParamsError
from pipeline_lib.features.backbones import Backbone, pack_levels, run_levels

PRECISIONS = ("float32", "bfloat16")  # the backbone's compute precision, see pick_precision


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


def check_compiled(compiled: torch.Tensor, eager: torch.Tensor, name: str) -> None:
    """Refuses (PipelineError) a compiled backbone whose features of one batch differ from the
    eager model's by more than 5 % of their largest magnitude, or are not finite: torch.compile's
    CPU code computes garbage (1e35, NaN) where ATen's kernels are capped below the CPU's own
    (`ATEN_CPU_CAPABILITY=avx2` on an AVX-512 CPU, torch 2.14); kernels that merely sum in
    another order, in float32 or bfloat16, stay far inside the bound."""
    compiled, eager = compiled.float(), eager.float()  # a batch holds at least one image
    difference, scale = float((compiled - eager).abs().max()), float(eager.abs().max())
    if not difference <= 0.05 * scale + 1e-3:  # NaN fails too
        capped = os.environ.get("ATEN_CPU_CAPABILITY")
        cause = f" or unset ATEN_CPU_CAPABILITY (={capped})" if capped else ""
        raise PipelineError(
            f"backbone.compile: the compiled {name} computes other features than the eager one "
            f"(largest difference {difference:.3g} on the first batch, features up to "
            f"{scale:.3g}); set backbone.compile: false{cause}"
        )


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
    checked = False  # whether the compiled model's first batch was checked against the eager one

    def call(x: torch.Tensor) -> torch.Tensor:
        nonlocal checked
        rows = x.shape[0]
        if batch_size and rows < batch_size:
            x = torch.cat([x, x.new_zeros((batch_size - rows, *x.shape[1:]))])
        if not compile:
            return run(x)[:rows]
        try:
            features = run(x)
        except torch._dynamo.exc.BackendCompilerFailed as error:
            cause = error.inner_exception  # the error's own first line names only the backend
            first = (str(cause).splitlines() or [""])[0][:200]
            raise PipelineError(
                f"backbone.compile: torch.compile failed for {backbone.name} "
                f"({type(cause).__name__}: {first}); set backbone.compile: false"
            ) from error
        if not checked:
            check_compiled(features, model(x), backbone.name)
            checked = True
        return features[:rows]

    bf16 = pick_precision(precision, device) == "bfloat16"

    def autocast():  # entered only for bfloat16: not every device has an autocast
        return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    @torch.inference_mode()
    def forward(batch: torch.Tensor) -> torch.Tensor:
        x = ((batch.float() - mean) / std).contiguous(memory_format=torch.channels_last)
        with autocast():
            return call(x).float()

    return forward
