"""The training loop's small parts (training.py), fast: the CPU-kernel pin and what it says on
each kind of machine, the metrics of the kept epoch, flipped images drawn from their own
generator."""

from __future__ import annotations

import os

import pytest
import torch

from pipeline_lib import training
from pipeline_lib.training import FitResult, Flips, best_epoch_stats, pin_cpu_kernels

KNOBS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")


@pytest.fixture
def machine(monkeypatch):
    """Plays a machine: `machine(arch, avx2, active)` sets what pin_cpu_kernels sees."""
    for knob in KNOBS:
        monkeypatch.setenv(knob, "before")  # restored after the test, whatever the pin sets
        monkeypatch.delenv(knob)

    def play(arch: str, avx2: bool = True, active: str = "AVX2"):
        monkeypatch.setattr(training.platform, "machine", lambda: arch)
        monkeypatch.setattr(training.torch.cpu, "_is_avx2_supported", lambda: avx2)
        monkeypatch.setattr(training.torch.backends.cpu, "get_cpu_capability", lambda: active)

    return play


def knobs() -> list[str | None]:
    return [os.environ.get(k) for k in KNOBS]


def test_the_pin_sets_both_libraries_to_avx2_on_x86(machine):
    for arch in ("x86_64", "AMD64"):
        machine(arch)
        assert pin_cpu_kernels("avx2") is None
        assert knobs() == ["avx2", "AVX2"]  # ATen's and oneDNN's spellings


def test_the_pin_says_why_it_cannot_hold(machine):
    machine("x86_64", active="AVX512")  # torch computed before the pin
    assert pin_cpu_kernels("avx2") == (
        "cpu_kernels: this process already chose AVX512 kernels (torch computed something "
        "before the pin): models may differ from other machines' ones"
    )
    for knob in KNOBS:
        os.environ.pop(knob)
    machine("x86_64", avx2=False)
    assert pin_cpu_kernels("avx2") == (
        "cpu_kernels: this CPU has no AVX2: models may differ from other machines' ones"
    )
    assert knobs() == [None, None]
    machine("aarch64")
    assert pin_cpu_kernels("avx2") == (
        "cpu_kernels: avx2 means nothing on aarch64 CPUs: models trained here are reproduced on "
        "this kind of CPU only"
    )
    assert knobs() == [None, None]


def test_native_leaves_everything_and_other_values_are_refused(machine):
    machine("x86_64")
    assert pin_cpu_kernels("native") is None and knobs() == [None, None]
    with pytest.raises(ValueError) as raised:
        pin_cpu_kernels("avx512")
    assert str(raised.value) == "cpu_kernels must be one of ('avx2', 'native'), got 'avx512'"


def test_the_kept_epochs_val_measures_go_to_the_metrics_rounded():
    history = [
        {"train": {"loss": 9.0}, "val": {"loss": 3.0, "accuracy": 0.1}},
        {"train": {"loss": 8.0}, "val": {"loss": 1.23456789, "accuracy": 2 / 3}},
        {"train": {"loss": 7.0}, "val": {"loss": 2.0, "accuracy": 0.5}},
    ]
    result = FitResult(best_epoch=2, best_monitor=1.23, best_state={}, history=history)
    assert best_epoch_stats(result) == {"val_loss": 1.234568, "val_accuracy": 0.666667}


def test_flips_are_drawn_from_their_own_generator_with_their_probability():
    """The draws depend on the flips' generator only (not torch's global one); probability 0
    flips nothing, 1 everything; flipped rows take the flipped features and targets."""
    n = 64
    x = torch.arange(1, n + 1, dtype=torch.float32).view(n, 1, 1, 1)  # > 0: flipped ones < 0
    targets = (torch.zeros(n, 2),)
    flipped = (torch.ones(n, 2),)

    def flips(probability: float, seed: int = 0) -> Flips:
        generator = torch.Generator().manual_seed(seed)
        return Flips(probability, flipped, generator, features=-x.double())

    rows = torch.arange(n)
    torch.manual_seed(1)
    a, (ta,) = flips(0.5).apply(rows, x, targets)
    torch.manual_seed(2)
    b, (tb,) = flips(0.5).apply(rows, x, targets)
    assert torch.equal(a, b) and torch.equal(ta, tb)
    chosen = a.flatten() < 0
    assert 10 < int(chosen.sum()) < 54  # about half
    assert a.dtype == torch.float32  # the flipped features in the batch's dtype
    assert torch.equal(a.flatten()[chosen], -x.flatten()[chosen])
    assert torch.equal(ta[chosen], torch.ones(int(chosen.sum()), 2))
    assert (ta[~chosen] == 0).all()
    none, _ = flips(0.0).apply(rows, x, targets)
    assert torch.equal(none, x)
    every, _ = flips(1.0).apply(rows, x, targets)
    assert torch.equal(every, -x)


def test_an_epochs_line_by_hand():
    stats = {
        "train": {"loss": 1.23456, "accuracy": 0.5, "iou": 0.25},
        "val": {"loss": 2.5, "box_loss": 0.125, "accuracy": 0.75, "iou": 1 / 3},
    }
    assert training.epoch_line(7, 20, stats) == (
        "epoch   7/20: train loss 1.2346 acc 0.500 iou 0.250 | "
        "val loss 2.5000 box 0.1250 acc 0.750 iou 0.333"
    )


def test_batches_in_row_order_or_in_the_given_order():
    features = torch.arange(10, dtype=torch.float16).view(10, 1, 1, 1).expand(10, 2, 3, 3)
    labels = torch.arange(10)
    data = training.Dataset(features, (labels,))
    batches = list(data.batches(4))
    assert [t[0].tolist() for _, t in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    x = batches[1][0]
    assert x.dtype == torch.float32 and x[:, 0, 0, 0].tolist() == [4, 5, 6, 7]
    assert x.is_contiguous(memory_format=torch.channels_last)  # the layout the heads train in
    order = torch.tensor([9, 3, 0, 7, 1, 2, 8, 4, 6, 5])
    shuffled = [t[0].tolist() for _, t in data.batches(3, order)]
    assert shuffled == [[9, 3, 0], [7, 1, 2], [8, 4, 6], [5]]
