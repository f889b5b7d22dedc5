"""The training loop's small parts (training/loop.py), fast: the CPU-kernel pin and what it says on
each kind of machine, the metrics of the kept epoch, flipped images drawn from their own
generator, and the loop itself by hand on a one-weight model (`OneWeight`: Adam moves it by
exactly its learning rate a step): moving average, weight decay, warm-up, schedules, the epoch
kept."""

from __future__ import annotations

import os
import random
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from pipeline_lib.models.losses import Objective
from pipeline_lib.training import loop
from pipeline_lib.training.loop import FitResult, Flips, best_epoch_stats, pin_cpu_kernels

KNOBS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")


@pytest.fixture
def machine(monkeypatch):
    """Plays a machine: `machine(arch, avx2, active)` sets what pin_cpu_kernels sees."""
    for knob in KNOBS:
        monkeypatch.setenv(knob, "before")  # restored after the test, whatever the pin sets
        monkeypatch.delenv(knob)

    def play(arch: str, avx2: bool = True, active: str = "AVX2"):
        monkeypatch.setattr(loop.platform, "machine", lambda: arch)
        monkeypatch.setattr(loop.torch.cpu, "_is_avx2_supported", lambda: avx2)
        monkeypatch.setattr(loop.torch.backends.cpu, "get_cpu_capability", lambda: active)

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
    assert loop.epoch_line(7, 20, stats) == (
        "epoch   7/20: train loss 1.2346 acc 0.500 iou 0.250 | "
        "val loss 2.5000 box 0.1250 acc 0.750 iou 0.333"
    )


def test_batches_in_row_order_or_in_the_given_order():
    features = torch.arange(10, dtype=torch.float16).view(10, 1, 1, 1).expand(10, 2, 3, 3)
    labels = torch.arange(10)
    data = loop.Dataset(features, (labels,))
    batches = list(data.batches(4))
    assert [t[0].tolist() for _, t in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    x = batches[1][0]
    assert x.dtype == torch.float32 and x[:, 0, 0, 0].tolist() == [4, 5, 6, 7]
    assert x.is_contiguous(memory_format=torch.channels_last)  # the layout the heads train in
    order = torch.tensor([9, 3, 0, 7, 1, 2, 8, 4, 6, 5])
    shuffled = [t[0].tolist() for _, t in data.batches(3, order)]
    assert shuffled == [[9, 3, 0], [7, 1, 2], [8, 4, 6], [5]]


# --- the loop (fit, run_epoch) on models small enough to follow by hand -----------------------
# One weight w, output w * x, loss = mean output: with x = 1 the gradient is 1 at every step, so
# Adam moves w by exactly its lr per step (m / sqrt(v) = 1).


class OneWeight(torch.nn.Module):
    """out = w * x; a buffer counting the training forward passes; a parameter nothing uses, or,
    with `spare_once`, that only the first training step uses."""

    def __init__(self, w: float = 2.0, spare_once: bool = False):
        super().__init__()
        self.spare_once = spare_once
        self.w = torch.nn.Parameter(torch.tensor([w]))
        self.spare = torch.nn.Parameter(torch.tensor([3.0]))
        self.register_buffer("steps", torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.steps += 1
        if self.training and self.spare_once and self.steps.item() == 1:
            return (self.w + self.spare) * x
        return self.w * x


def mean_output(scale: float = 1.0) -> Objective:
    return Objective(lambda out, _: {"loss": scale * out.mean()}, lambda out, _: {})


def ones(n: int = 4, sign: float = 1.0) -> loop.Dataset:
    return loop.Dataset(sign * torch.ones(n, 1), (torch.zeros(n, 1),))


def config(epochs: int = 1, batch_size: int = 2, lr: float = 0.1, **changes):
    return replace(loop.TrainConfig(epochs, batch_size, lr, 0.0, monitor="last"), **changes)


def test_the_moving_average_mixes_decay_of_itself_buffers_included():
    # Two steps: w 2.0 -> 1.9 -> 1.8, steps 1 -> 2. The average starts at the first step's
    # values, then e2 = 0.25 e1 + 0.75 x2: w 0.25 * 1.9 + 0.75 * 1.8 = 1.825, steps 1.75.
    head = OneWeight()
    result = loop.fit(head, ones(), ones(), mean_output(), config(ema_decay=0.25), progress=False)
    assert head.w.item() == pytest.approx(1.8, abs=1e-6)
    assert result.best_state["w"].item() == pytest.approx(1.825, abs=1e-6)
    assert result.best_state["steps"].item() == pytest.approx(1.75)
    plain = loop.fit(OneWeight(), ones(), ones(), mean_output(), config(), progress=False)
    assert plain.best_state["w"].item() == pytest.approx(1.8, abs=1e-6)
    assert plain.best_state["steps"].item() == 2


def test_validation_sees_the_moving_average_and_training_the_live_weight():
    # Decay 0.5: e1 = 1.9, e2 = 0.5 * 1.9 + 0.5 * 1.8 = 1.85. The val loss (the mean output) is
    # the average's; the train loss the mean of the live weights the two steps started from.
    head = OneWeight()
    result = loop.fit(head, ones(), ones(), mean_output(), config(ema_decay=0.5), progress=False)
    assert head.w.item() == pytest.approx(1.8, abs=1e-6)
    assert result.best_state["w"].item() == pytest.approx(1.85, abs=1e-6)
    assert result.history[0]["val"]["loss"] == pytest.approx(1.85, abs=1e-6)
    assert result.history[0]["train"]["loss"] == pytest.approx((2.0 + 1.9) / 2, abs=1e-6)


def test_weight_decay_is_added_to_the_gradient():
    # loss 0 * output: a zero gradient, which leaves w alone unless decay adds wd * w = 0.02;
    # Adam's first step moves w by its lr in that direction: 2.0 -> 1.9.
    still = loop.fit(
        OneWeight(), ones(), ones(), mean_output(0.0), config(batch_size=4), progress=False
    )
    assert still.best_state["w"].item() == 2.0
    decayed = config(batch_size=4, weight_decay=0.01)
    moved = loop.fit(OneWeight(), ones(), ones(), mean_output(0.0), decayed, progress=False)
    assert moved.best_state["w"].item() == pytest.approx(1.9, abs=1e-6)


def test_a_parameter_a_step_did_not_reach_is_left_alone_in_that_step():
    """Gradients are reset to None, not zero, so Adam skips what a step's loss did not reach
    (with a zero gradient its momentum would still move it)."""
    for warmup in (0.0, 1.0):  # without and with the warm-up wrapper
        head = OneWeight()
        changes = {"weight_decay": 0.1, "warmup_epochs": warmup, "epochs": 2}
        loop.fit(head, ones(), ones(), mean_output(), config(**changes), progress=False)
        assert head.spare.item() == 3.0 and head.w.item() < 2.0  # never reached
        # reached by the first of two steps only (one batch an epoch): moved once, by the
        # first step's rate (warm-up over one epoch of one step: the full rate)
        head = OneWeight(spare_once=True)
        changes = {"warmup_epochs": warmup, "epochs": 2, "batch_size": 4}
        loop.fit(head, ones(), ones(), mean_output(), config(**changes), progress=False)
        assert head.spare.item() == pytest.approx(2.9, abs=1e-6)


def test_a_warm_up_of_one_epoch_halves_its_first_of_two_steps():
    # two batches an epoch, warm-up over one epoch = 2 steps: 0.05 then 0.1: 2.0 -> 1.85
    head = OneWeight()
    result = loop.fit(
        head, ones(), ones(), mean_output(), config(warmup_epochs=1.0), progress=False
    )
    assert head.w.item() == pytest.approx(1.85, abs=1e-6)
    assert result.history[0]["lr"] == 0.1


def test_a_warm_up_of_a_fraction_of_an_epoch_ends_within_the_second():
    # Warm-up over 1.5 epochs of two batches = 3 steps: 0.1 * 1/3, 0.1 * 2/3, then 0.1 and 0.1
    # (2 epochs, 4 steps): 2.0 -> 2.0 - 0.1 * (1/3 + 2/3 + 1 + 1) = 1.7; the epochs' rate is
    # the schedule's (constant), not the warmed-up one.
    head = OneWeight()
    changes = {"epochs": 2, "warmup_epochs": 1.5}
    result = loop.fit(head, ones(), ones(), mean_output(), config(**changes), progress=False)
    assert head.w.item() == pytest.approx(1.7, abs=1e-5)
    assert [epoch["lr"] for epoch in result.history] == [0.1, 0.1]
    assert result.history[0]["train"]["loss"] == pytest.approx((2.0 + 2.0 - 0.1 / 3) / 2, abs=1e-5)


def test_each_epoch_is_reported_to_on_epoch_with_its_figures():
    calls = []
    result = loop.fit(
        OneWeight(),
        ones(),
        ones(),
        mean_output(),
        config(epochs=2),
        lambda epoch, stats: calls.append((epoch, stats)),
        progress=False,
    )
    assert calls == [(1, result.history[0]), (2, result.history[1])]
    assert calls[0][1]["val"]["loss"] == pytest.approx(1.8, abs=1e-6)


def test_an_unknown_monitor_is_refused_naming_the_known_ones():
    with pytest.raises(ValueError) as raised:
        loop.fit(OneWeight(), ones(), ones(), mean_output(), config(monitor="map"), progress=False)
    assert str(raised.value) == (
        "monitor must be one of ['box_loss_plus_error', 'loss', 'last'], got 'map'"
    )


def test_the_earliest_of_equal_epochs_is_kept_and_its_state_is_a_copy():
    # lr 0: every epoch the same val loss -> epoch 1
    tied = config(epochs=3, lr=0.0, monitor="loss")
    assert (
        loop.fit(OneWeight(), ones(), ones(), mean_output(), tied, progress=False).best_epoch == 1
    )
    # val on x = -1: its loss -w rises as training lowers w, so epoch 1 (w = 1.8) is kept, while
    # training goes on to 1.4
    head = OneWeight()
    falling = config(epochs=3, monitor="loss")
    result = loop.fit(head, ones(), ones(sign=-1.0), mean_output(), falling, progress=False)
    assert result.best_epoch == 1 and result.best_monitor == pytest.approx(-1.8, abs=1e-6)
    assert result.best_state["w"].item() == pytest.approx(1.8, abs=1e-6)
    assert head.w.item() == pytest.approx(1.4, abs=1e-6)


def test_a_val_monitor_that_is_never_a_number_is_an_error():
    nan = Objective(lambda out, _: {"loss": out.mean() * float("nan")}, lambda o, _: {})
    with pytest.raises(loop.PipelineError) as raised:
        loop.fit(OneWeight(), ones(), ones(), nan, config(epochs=2, monitor="loss"), progress=False)
    assert str(raised.value) == (
        "training diverged: the val loss was not a number in any of the 2 epochs "
        "(a lower train.lr may help)"
    )


def test_fit_reports_its_time_and_trains_in_channels_last_with_fused_adam(monkeypatch):
    made = []

    class Adam(torch.optim.Adam):
        def __init__(self, *args, **kwargs):
            made.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(loop.torch.optim, "Adam", Adam)
    head = torch.nn.Conv2d(3, 4, 3)
    data = loop.Dataset(torch.ones(4, 3, 5, 5), (torch.zeros(4),))
    start = time.perf_counter()
    result = loop.fit(head, data, data, mean_output(), config(), progress=False)
    wall = time.perf_counter() - start
    assert 0 < result.seconds <= wall
    assert head.weight.is_contiguous(memory_format=torch.channels_last)
    assert not head.weight.is_contiguous()  # (4, 3, 3, 3): the two layouts differ
    (kwargs,) = made
    assert kwargs["fused"] is True and kwargs["lr"] == 0.1


def test_each_epoch_shows_a_progress_bar_that_clears_itself(capsys):
    loop.fit(OneWeight(), ones(), ones(), mean_output(), config(epochs=2))
    shown = capsys.readouterr().err
    for epoch in (1, 2):
        assert f"epoch {epoch}/2:   0%|          | 0/2 [00:00<?, ?batch/s]" in shown
    assert "\n" not in shown  # leave=False: the line is wiped at the end
    loop.fit(OneWeight(), ones(), ones(), mean_output(), config(epochs=2), progress=False)
    assert capsys.readouterr().err == ""


def test_validation_reads_rows_in_order_and_a_measure_without_count_is_zero():
    seen = []

    def measure(out, targets):
        seen.extend(targets[0].flatten().tolist())
        return {"hits": (0.0, 0.0), "half": (1.0, 2.0)}

    data = loop.Dataset(torch.ones(5, 1), (torch.arange(5.0).view(5, 1),))
    objective = Objective(lambda out, _: {"loss": out.mean()}, measure)
    stats = loop.run_epoch(OneWeight(), data, objective, config())
    assert seen == [0, 1, 2, 3, 4]
    assert stats == {"loss": pytest.approx(2.0), "hits": 0.0, "half": 0.5}


def test_fit_refuses_what_it_cannot_train_naming_the_counts():
    bn = torch.nn.Sequential(torch.nn.Linear(1, 2), torch.nn.BatchNorm1d(2))
    cases = [
        (OneWeight(), ones(4), ones(0), "nothing to train on: 4 train and 0 val samples"),
        (OneWeight(), ones(0), ones(3), "nothing to train on: 0 train and 3 val samples"),
        (
            bn,
            ones(1),
            ones(2),
            "one training sample: the head's BatchNorm needs 2 or more per batch",
        ),
    ]
    for head, train, val, message in cases:
        with pytest.raises(loop.PipelineError) as raised:
            loop.fit(head, train, val, mean_output(), config(), progress=False)
        assert str(raised.value) == message
    with pytest.raises(loop.PipelineError) as raised:
        loop.fit(bn, ones(4), ones(2), mean_output(), config(batch_size=1), progress=False)
    assert str(raised.value) == (
        "batch size 1: the head's BatchNorm needs 2 or more samples per batch"
    )
    # the smallest that work: one val sample, two training samples for a BatchNorm head
    assert loop.fit(
        OneWeight(), ones(2), ones(1), mean_output(), config(), progress=False
    ).best_epoch
    assert loop.fit(bn, ones(2), ones(1), mean_output(), config(), progress=False).best_epoch == 1


@pytest.fixture
def global_seeds():
    yield
    torch.use_deterministic_algorithms(False)


def test_seed_everything_seeds_python_numpy_and_torch(global_seeds):
    loop.seed_everything(3)
    assert random.random() == random.Random(3).random()
    assert np.random.rand() == np.random.RandomState(3).rand()
    assert torch.rand(1).item() == torch.rand(1, generator=torch.Generator().manual_seed(3)).item()
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.is_deterministic_algorithms_warn_only_enabled()  # warns, does not fail


def test_the_cosine_schedule_lowers_the_rate_each_epoch_by_hand():
    # 3 epochs of one step: rates 0.1 (1 + cos(pi e / 3)) / 2 for e = 0, 1, 2 -> 0.1, 0.075,
    # 0.025; Adam moves w by each: 2.0 -> 1.8. The constant schedule keeps 0.1: 2.0 -> 1.7.
    head = OneWeight()
    cosine = config(epochs=3, batch_size=4, lr_schedule="cosine")
    result = loop.fit(head, ones(), ones(), mean_output(), cosine, progress=False)
    assert [e["lr"] for e in result.history] == pytest.approx([0.1, 0.075, 0.025])
    assert head.w.item() == pytest.approx(1.8, abs=1e-6)
    head = OneWeight()
    constant = config(epochs=3, batch_size=4)
    result = loop.fit(head, ones(), ones(), mean_output(), constant, progress=False)
    assert [e["lr"] for e in result.history] == [0.1] * 3
    assert head.w.item() == pytest.approx(1.7, abs=1e-6)
