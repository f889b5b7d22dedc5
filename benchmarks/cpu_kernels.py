"""What `train.cpu_kernels: avx2` costs: head training with the kernels capped at AVX2 against
the machine's own best kernels, side by side in one run.

    .venv/bin/python benchmarks/cpu_kernels.py [--epochs 5] [--repeats 2] [--images 400]

In a temporary working folder the real stages make the default synthetic dataset (`--images`
training images, a quarter as many for val) and its features once, then `train single` and
`train multi` run with `train.cpu_kernels` native and avx2, alternating, `--repeats` times each.
Prints the CPU's vector features, seconds per epoch of every run (as the stage reports it), the
avx2 / native ratio of the medians, and the model hashes (avx2 runs must agree with each other; on
an AVX2-only CPU native runs agree with them too, since the kernels are the same).
"""

from __future__ import annotations

import hashlib
import re
import statistics
import tempfile
from pathlib import Path

import torch
import typer
from workfolder import stage, write_params


def cpu_features() -> str:
    flags = {
        "AVX2": torch.cpu._is_avx2_supported(),
        "AVX-512": torch.cpu._is_avx512_supported(),
        "AVX-512 BF16": torch.cpu._is_avx512_bf16_supported(),
        "AMX": torch.cpu._is_amx_tile_supported(),
    }
    have = ", ".join(name for name, present in flags.items() if present) or "none"
    return f"{have}; native ATen kernels: {torch.backends.cpu.get_cpu_capability()}"


def main(epochs: int = 5, repeats: int = 2, images: int = 400) -> None:
    print(
        f"CPU vector features: {cpu_features()}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        base = {
            "data.synthetic.n_train": images,
            "data.synthetic.n_val": max(images // 4, 8),
            "train.epochs": epochs,
        }
        write_params(folder, base)
        for name in ("synthesize", "prepare", "extract"):
            stage(folder, name)
        seconds: dict[tuple[str, str], list[float]] = {}
        hashes: dict[tuple[str, str], set[str]] = {}
        for _ in range(repeats):
            for kind in ("single", "multi"):
                for kernels in ("native", "avx2"):
                    write_params(folder, base | {"train.cpu_kernels": kernels})
                    output = stage(folder, "train", kind, "--no-progress")
                    per_epoch = float(re.search(r"([\d.]+) s/epoch", output).group(1))
                    digest = hashlib.md5((folder / f"models/{kind}.safetensors").read_bytes())
                    seconds.setdefault((kind, kernels), []).append(per_epoch)
                    hashes.setdefault((kind, kernels), set()).add(digest.hexdigest()[:8])
    print(f"{images} training images, {epochs} epochs per run, s/epoch per run:")
    for kind in ("single", "multi"):
        for kernels in ("native", "avx2"):
            runs = ", ".join(f"{s:.2f}" for s in seconds[kind, kernels])
            models = ", ".join(sorted(hashes[kind, kernels]))
            print(f"  {kind:6s} {kernels:6s}: {runs} s/epoch; model md5 {models}")
        ratio = statistics.median(seconds[kind, "avx2"]) / statistics.median(
            seconds[kind, "native"]
        )
        print(f"  {kind}: avx2 / native = {ratio:.2f} (median s/epoch)")


if __name__ == "__main__":
    typer.run(main)
