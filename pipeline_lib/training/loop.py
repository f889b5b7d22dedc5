"""The training loop shared by the heads: cached features in, best checkpoint state out.

Features stay in RAM in their stored dtype (float16 by default) and each batch is cast to float32
on the fly. A task plugs in two functions of (head outputs, batch targets):
- `loss_fn` -> dict of scalar tensors, "loss" being minimised (e.g. losses.single_object_loss),
- `measure_fn` -> dict of per-batch (sum, count) pairs (e.g. correct predictions, predictions),
  averaged as total sum / total count over the epoch.
Every epoch reports, for train and val, the sample-weighted mean of each loss part and measure;
the epoch with the lowest monitor value on val is kept (or the last one: monitor "last").
"""

from __future__ import annotations

import math
import os
import platform
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from pipeline_lib.base.distributed import sum_over_ranks, unwrap
from pipeline_lib.base.errors import PipelineError
from pipeline_lib.models.losses import Objective, Outputs

FUSED_ADAM_DEVICES = ("cpu", "cuda")

MONITORS = {
    # The lab's choice: box regression and classification on one scale.
    "box_loss_plus_error": lambda stats: stats["box_loss"] + 1.0 - stats["accuracy"],
    "loss": lambda stats: stats["loss"],
    # The last epoch whatever its val figures (its val loss is reported): for schedules that end
    # low (cosine), where val loss can rise while detections still improve.
    "last": lambda stats: stats["loss"],
}


CHANNELS_LAST = torch.channels_last  # the layout heads train in (see fit)


@dataclass
class Flips:
    """The images flipped left to right, each taken instead of its original with `probability`
    (drawn from `generator` at every batch): their targets, aligned with the originals', and
    their features, extracted from the flipped images (backbone.hflip), or None to flip the
    original's cached maps with `mirror` (no extraction; a map is not the flipped image's map:
    channels that see oriented patterns do not swap)."""

    probability: float
    targets: tuple[torch.Tensor, ...]
    generator: torch.Generator
    features: torch.Tensor | None = None  # or featurefiles.FeatureRows
    mirror: Callable[[torch.Tensor], torch.Tensor] | None = None

    def apply(self, rows: torch.Tensor, x: torch.Tensor, targets: tuple[torch.Tensor, ...]):
        """A batch's features and targets (rows `rows` of the dataset) with the drawn ones
        flipped."""
        chosen = torch.rand(len(rows), generator=self.generator) < self.probability
        if not chosen.any():
            return x, targets
        x, flipped = x.clone(), rows[chosen]
        if self.features is not None:
            x[chosen] = self.features[flipped].to(x.dtype)
        else:
            x[chosen] = self.mirror(x[chosen])
        mixed = []
        for t, mirrored in zip(targets, self.targets, strict=True):
            t = t.clone()
            t[chosen] = mirrored[flipped]
            mixed.append(t)
        return x, tuple(mixed)


@dataclass
class Dataset:
    """Features (N, C, H, W) and the targets aligned with them on the first dimension; `flips`:
    flipped images sampled in their place in shuffled batches (training)."""

    features: torch.Tensor
    targets: tuple[torch.Tensor, ...]
    flips: Flips | None = None

    def __len__(self) -> int:
        return len(self.features)

    def batches(self, batch_size: int, order: torch.Tensor | None = None, device=None):
        """(float32 features, targets) per batch on `device`, in `order` (a permutation) or in
        row order."""
        for start in range(0, len(self), batch_size):
            end = start + batch_size
            rows = slice(start, end) if order is None else order[start:end]
            x, targets = self.features[rows], tuple(t[rows] for t in self.targets)
            if self.flips is not None and order is not None:  # training: shuffled batches
                x, targets = self.flips.apply(rows, x, targets)
            x = x.to(device, non_blocking=True).float()
            if x.dim() == 4:  # feature maps
                x = x.contiguous(memory_format=CHANNELS_LAST)
            yield x, tuple(t.to(device, non_blocking=True) for t in targets)


@dataclass
class TrainConfig:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    lr_schedule: str = "constant"  # constant | cosine
    seed: int = 0
    monitor: str = "box_loss_plus_error"
    device: str = "cpu"
    ema_decay: float = 0.0  # > 0: validate and keep an exponential moving average of the weights
    warmup_epochs: float = 0.0  # > 0: the learning rate grows linearly over these first epochs


@dataclass
class FitResult:
    best_epoch: int  # 1-based
    best_monitor: float
    best_state: dict[str, torch.Tensor]
    history: list[dict] = field(default_factory=list)  # per epoch: {"train": {...}, "val": {...}}
    seconds: float = 0.0


# Which CPU kernels train a head (params.yaml train.cpu_kernels). PyTorch picks its CPU kernels by
# what the processor offers: ATen's vectorised loops (BatchNorm statistics, loss sums, optimiser
# updates) use 8 float lanes with AVX2 and 16 with AVX-512, and oneDNN's convolutions block their
# sums by instruction set. Sums taken in another order end in other last bits, and twenty epochs of
# training grow those into another model. Capping both at AVX2 makes an AVX-512 machine compute
# what an AVX2-only machine computes (measured: the grid head of the default chain, bit for bit,
# with no measurable slowdown; benchmarks/cpu_kernels.py).
CPU_KERNELS = ("avx2", "native")


def pin_cpu_kernels(kernels: str) -> str | None:
    """Cap this process's CPU kernels at AVX2 (`kernels="avx2"`), or leave each library its best
    (`"native"`). Returns None when the choice holds, else a one-line warning saying why not.

    ATen reads `ATEN_CPU_CAPABILITY` and oneDNN `ONEDNN_MAX_CPU_ISA` once, at their first
    operation, so this must run before the process computes anything with torch.
    """
    if kernels not in CPU_KERNELS:
        raise ValueError(f"cpu_kernels must be one of {CPU_KERNELS}, got {kernels!r}")
    if kernels == "native":
        return None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return (
            f"cpu_kernels: avx2 means nothing on {platform.machine()} CPUs: models trained here "
            "are reproduced on this kind of CPU only"
        )
    if not torch.cpu._is_avx2_supported():  # cpuinfo; does not fix ATen's choice
        return "cpu_kernels: this CPU has no AVX2: models may differ from other machines' ones"
    os.environ["ATEN_CPU_CAPABILITY"] = "avx2"
    os.environ["ONEDNN_MAX_CPU_ISA"] = "AVX2"
    active = torch.backends.cpu.get_cpu_capability()
    if active != "AVX2":
        return (
            f"cpu_kernels: this process already chose {active} kernels (torch computed something "
            "before the pin): models may differ from other machines' ones"
        )
    return None


class WarmUp:
    """`optimizer` whose first `steps` steps take (step + 1) / steps of its learning rate, the
    rate the schedule (per epoch) sets being restored after each: a linear warm-up, so that the
    first updates of a fresh head stay small (FCOS's ReLU box outputs die under Adam's full first
    steps). Used as the optimizer (`zero_grad`, `step`)."""

    def __init__(self, optimizer: torch.optim.Optimizer, steps: int):
        self.optimizer, self.steps, self.done = optimizer, steps, 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        groups = self.optimizer.param_groups
        rates = [group["lr"] for group in groups]
        if self.done < self.steps:
            for group in groups:
                group["lr"] *= (self.done + 1) / self.steps
        self.optimizer.step()
        for group, rate in zip(groups, rates, strict=True):
            group["lr"] = rate
        self.done += 1


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch, and ask torch for deterministic kernels (same params, same
    numbers on the same machine)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def run_epoch(
    head: nn.Module,
    data: Dataset,
    objective: Objective,
    config: TrainConfig,
    optimizer: torch.optim.Optimizer | None = None,
    generator: torch.Generator | None = None,
    progress: str | None = None,
    ema: AveragedModel | None = None,
) -> dict[str, float]:
    """One pass over `data` in batches of `config.batch_size` on `config.device`: trains
    (shuffled with `generator`) when an optimizer is given, else evaluates. `progress`: the
    progress bar's label (None: no bar); `ema`: the weights' moving average, updated after each
    optimiser step.

    Returns the sample-weighted means of the loss parts, and the measures (sum / count).
    """
    training = optimizer is not None
    head.train(training)
    order = torch.randperm(len(data), generator=generator) if training else None
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    total = math.ceil(len(data) / config.batch_size)
    with torch.set_grad_enabled(training):
        batches = data.batches(config.batch_size, order, config.device)
        bar = tqdm(
            batches, total=total, desc=progress, unit="batch", leave=False, disable=progress is None
        )
        for x, targets in bar:
            if training and len(x) == 1 and _has_batchnorm(head):
                continue  # BatchNorm cannot train on a batch of one
            outputs = head(x)
            losses = objective.loss_fn(outputs, targets)
            if training:
                optimizer.zero_grad(set_to_none=True)
                losses["loss"].backward()
                optimizer.step()
                if ema is not None:
                    ema.update_parameters(head)
            parts = {name: (value.item() * len(x), len(x)) for name, value in losses.items()}
            with torch.no_grad():
                parts |= objective.measure_fn(outputs, targets)
            for name, (value, count) in parts.items():
                sums[name] = sums.get(name, 0.0) + float(value)
                counts[name] = counts.get(name, 0.0) + float(count)
    sums, counts = sum_over_ranks(sums), sum_over_ranks(counts)  # under torchrun: the job's
    return {name: sums[name] / counts[name] if counts[name] else 0.0 for name in sums}


def fit(
    head: nn.Module,
    train: Dataset,
    val: Dataset,
    objective: Objective,
    config: TrainConfig,
    on_epoch: Callable[[int, dict], None] | None = None,
    progress: bool = True,
) -> FitResult:
    """Train `head` with Adam for `config.epochs`; return the state of the best epoch on val
    (with `config.ema_decay`: of the weights' moving average, which is also what val measures)."""
    _check_fit(head, train, val, config)
    # channels_last: oneDNN's and cuDNN's faster layout for the heads' convolutions (8 % less time
    # per epoch for the conv grid head on 2 CPU cores); batches follow (Dataset.batches).
    head.to(config.device, memory_format=torch.channels_last)
    # fused: one kernel per step instead of many full-size temporaries (2.5x faster on CPU for
    # the 64M-parameter box MLP on flattened EfficientNet-Lite0 features); CPUs and CUDA GPUs
    # have it, other devices take Adam's own choice.
    fused = torch.device(config.device).type in FUSED_ADAM_DEVICES or None
    optimizer = torch.optim.Adam(
        head.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=fused
    )
    stepper = optimizer
    if config.warmup_epochs > 0:
        batches = math.ceil(len(train) / config.batch_size)
        stepper = WarmUp(optimizer, math.ceil(config.warmup_epochs * batches))
    scheduler = None
    if config.lr_schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    generator = torch.Generator().manual_seed(config.seed)
    ema, kept = None, head
    if config.ema_decay > 0:  # BatchNorm statistics are averaged with the weights (use_buffers)
        multi_avg_fn = get_ema_multi_avg_fn(config.ema_decay)
        ema = AveragedModel(head, multi_avg_fn=multi_avg_fn, use_buffers=True)
        kept = ema.module
    result = FitResult(best_epoch=0, best_monitor=math.inf, best_state={})
    start = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        label = f"epoch {epoch}/{config.epochs}" if progress else None
        train_stats = run_epoch(head, train, objective, config, stepper, generator, label, ema)
        val_stats = run_epoch(kept, val, objective, config)
        stats = {"train": train_stats, "val": val_stats, "lr": optimizer.param_groups[0]["lr"]}
        if scheduler is not None:
            scheduler.step()
        monitor = MONITORS[config.monitor](val_stats)
        if monitor < result.best_monitor or config.monitor == "last":
            result.best_epoch, result.best_monitor = epoch, monitor
            result.best_state = {
                k: v.detach().to("cpu", copy=True) for k, v in unwrap(kept).state_dict().items()
            }
        result.history.append(stats)
        if on_epoch is not None:
            on_epoch(epoch, stats)
    result.seconds = time.perf_counter() - start
    head.to("cpu")
    if result.best_epoch == 0:  # NaN is never below the best so far
        raise PipelineError(
            f"training diverged: the val {config.monitor} was not a number in any of the "
            f"{config.epochs} epochs (a lower train.lr may help)"
        )
    return result


def _check_fit(head: nn.Module, train: Dataset, val: Dataset, config: TrainConfig) -> None:
    if len(train) == 0 or len(val) == 0:
        raise PipelineError(f"nothing to train on: {len(train)} train and {len(val)} val samples")
    if len(train) < 2 and _has_batchnorm(head):
        raise PipelineError("one training sample: the head's BatchNorm needs 2 or more per batch")
    if config.batch_size < 2 and _has_batchnorm(head):
        raise PipelineError("batch size 1: the head's BatchNorm needs 2 or more samples per batch")
    if config.monitor not in MONITORS:
        raise ValueError(f"monitor must be one of {list(MONITORS)}, got {config.monitor!r}")


def best_epoch_stats(result: FitResult) -> dict[str, float]:
    """The best epoch's val measures as `val_<name>`, rounded to 6 digits (for metrics files)."""
    best = result.history[result.best_epoch - 1]["val"]
    return {f"val_{name}": round(value, 6) for name, value in best.items()}


def epoch_line(epoch: int, epochs: int, stats: dict) -> str:
    """One epoch's progress line: train loss, val loss and measures."""
    tr, va = stats["train"], stats["val"]
    return (
        f"epoch {epoch:3d}/{epochs}: train loss {tr['loss']:.4f} acc {tr['accuracy']:.3f} "
        f"iou {tr['iou']:.3f} | val loss {va['loss']:.4f} box {va['box_loss']:.4f} "
        f"acc {va['accuracy']:.3f} iou {va['iou']:.3f}"
    )


@torch.no_grad()
def predict(head: nn.Module, features: torch.Tensor, batch_size: int = 256) -> Outputs:
    """Run `head` in eval mode over (N, C, H, W) features; outputs concatenated over batches."""
    head.eval()
    parts = [
        head(features[i : i + batch_size].float()) for i in range(0, len(features), batch_size)
    ]
    return tuple(torch.cat(p) for p in zip(*parts, strict=True))


def _has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())
