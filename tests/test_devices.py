"""Where and how a backbone runs (features/devices.py): the device, the decoding processes, the
precision the hardware takes, and the model function (normalisation, padding, channels_last,
compile, bfloat16 autocast), on stand-in backbones and played hardware."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pipeline_lib.base.errors import PipelineError
from pipeline_lib.base.params import ParamsError, load_params
from pipeline_lib.features import devices as devices_lib
from pipeline_lib.features import extraction as features_lib
from pipeline_lib.features.backbones import Backbone
from pipeline_lib.features.devices import check_compiled, pick_precision, prepare_model
from pipeline_lib.features.extraction import ExtractSettings

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("device", "avx512_bf16", "amx", "gpu_bf16", "expected"),
    [
        ("cpu", True, False, False, "bfloat16"),  # AVX-512 BF16
        ("cpu", False, True, False, "bfloat16"),  # AMX tiles
        ("cpu", False, False, True, "float32"),  # AVX2 only (a GPU elsewhere does not count)
        ("cuda", False, False, True, "bfloat16"),  # Ampere on
        ("cuda", True, True, False, "float32"),  # an older GPU (bfloat16 only emulated)
    ],
)
def test_auto_precision_follows_the_hardware(
    monkeypatch, device, avx512_bf16, amx, gpu_bf16, expected
):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    asked = []

    def gpu(including_emulation=True):
        asked.append(including_emulation)
        return gpu_bf16 or including_emulation  # torch's default counts emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", gpu)
    assert pick_precision("auto", torch.device(device)) == expected
    assert asked == ([False] if device == "cuda" else [])
    for chosen in ("float32", "bfloat16"):  # asked for by name: kept on any hardware
        assert pick_precision(chosen, torch.device(device)) == chosen
    with pytest.raises(ParamsError, match="backbone.precision: 'float16'"):
        pick_precision("float16", torch.device(device))


def test_devices_other_than_cpu_and_cuda_compute_in_float32_unless_asked():
    meta = torch.device("meta")
    assert not devices_lib.native_bfloat16(meta)
    assert pick_precision("auto", meta) == "float32"
    assert pick_precision("bfloat16", meta) == "bfloat16"


def test_decoding_workers_by_device(monkeypatch):
    monkeypatch.setattr(devices_lib.os, "cpu_count", lambda: 40)
    pick = devices_lib.pick_workers
    assert pick("auto", torch.device("cpu")) == 1  # the model needs the cores
    assert pick("auto", torch.device("cuda")) == 16 and pick("auto", torch.device("meta")) == 16
    assert pick(3, torch.device("cpu")) == 3 and pick("0", torch.device("cuda")) == 0
    monkeypatch.setattr(devices_lib.os, "cpu_count", lambda: None)
    assert pick("auto", torch.device("cuda")) == 1


class Recorder(torch.nn.Module):
    """A stand-in backbone: records each input and returns its first channel."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)  # a weight whose layout prepare_model sets
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x)
        return x[:, :1]


def recorder_backbone() -> Backbone:
    return Backbone("stand-in", "all", "random", Recorder(), (0.5, 0.25, 0.0), (0.5, 0.5, 0.25))


def test_prepare_model_normalises_pads_short_batches_and_uses_channels_last():
    backbone = recorder_backbone()
    forward = prepare_model(backbone, torch.device("cpu"), batch_size=4)
    module = backbone.module
    assert module.conv.weight.is_contiguous(memory_format=torch.channels_last)
    batch = torch.full((3, 3, 2, 2), 255, dtype=torch.uint8)
    out = forward(batch)
    (seen,) = module.inputs
    assert seen.shape == (4, 3, 2, 2)  # padded to the batch size with zeros
    # (255 - 255 mean) / (255 std) channel by channel
    assert seen[:3, :, 0, 0].tolist() == [[1.0, 1.5, 4.0]] * 3
    assert seen[3].abs().sum() == 0
    assert out.shape == (3, 1, 2, 2) and out.dtype == torch.float32
    module.inputs.clear()
    forward(torch.zeros(4, 3, 2, 2, dtype=torch.uint8))  # a full batch goes as it is
    assert [x.shape[0] for x in module.inputs] == [4]
    auto = prepare_model(recorder_backbone(), torch.device("cpu"), precision="auto")
    assert auto(batch).shape == (3, 1, 2, 2)


def test_compile_goes_through_torch_compile_frozen_and_static(monkeypatch):
    """torch.compile itself runs in test_compiled_path_equals_eager_with_a_padded_last_batch (a
    process of its own); here a stand-in records how it is asked, then fails as inductor can."""
    calls = []

    def compile_(model, **kwargs):
        calls.append(kwargs)
        return lambda x: model(x) * 1.01  # within check_compiled's 5 % of the eager model

    monkeypatch.setattr(features_lib.torch, "compile", compile_)
    batch = torch.full((2, 3, 2, 2), 255, dtype=torch.uint8)
    eager = prepare_model(recorder_backbone(), torch.device("cpu"))
    assert calls == [] and eager(batch)[0, 0, 0, 0].item() == 1.0
    compiled = prepare_model(recorder_backbone(), torch.device("cpu"), compile=True)
    assert calls == [{"dynamic": False, "options": {"freezing": True}}]
    assert compiled(batch)[0, 0, 0, 0].item() == pytest.approx(1.01)

    def failure(inner: Exception) -> str:
        """The message of a compiled model whose compiler fails with `inner`."""

        def failing(model, **kwargs):
            def run(x):
                raise torch._dynamo.exc.BackendCompilerFailed(lambda: None, inner, None)

            return run

        monkeypatch.setattr(features_lib.torch, "compile", failing)
        broken = prepare_model(recorder_backbone(), torch.device("cpu"), compile=True)
        with pytest.raises(PipelineError) as raised:
            broken(batch)
        return str(raised.value)

    assert failure(RuntimeError("inductor: no C++ compiler\nsecond line")) == (
        "backbone.compile: torch.compile failed for stand-in (RuntimeError: inductor: no C++ "
        "compiler); set backbone.compile: false"
    )
    assert failure(RuntimeError("")).endswith("(RuntimeError: ); set backbone.compile: false")
    long = failure(OSError("x" * 300))  # the first 200 characters of the first line
    assert long.endswith(f"(OSError: {'x' * 200}); set backbone.compile: false")


def test_a_compiled_model_computing_other_features_is_refused(monkeypatch):
    """torch.compile where ATen's kernels are capped below the CPU's (ATEN_CPU_CAPABILITY=avx2 on
    an AVX-512 CPU, torch 2.14) computes values of 1e35 and NaN: the first batch is compared with
    the eager model's, which gives 1.0 here; 5 % of that (and 1e-3) is allowed."""
    batch = torch.full((2, 3, 2, 2), 255, dtype=torch.uint8)

    def compiled_as(factor: float):
        monkeypatch.setattr(
            features_lib.torch, "compile", lambda model, **kwargs: lambda x: model(x) * factor
        )
        return prepare_model(recorder_backbone(), torch.device("cpu"), compile=True)

    assert compiled_as(1.05)(batch)[0, 0, 0, 0].item() == pytest.approx(1.05)  # 0.05 <= 0.051
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    with pytest.raises(PipelineError) as raised:
        compiled_as(1.052)(batch)
    assert str(raised.value) == (
        "backbone.compile: the compiled stand-in computes other features than the eager one "
        "(largest difference 0.052 on the first batch, features up to 1); set backbone.compile: "
        "false"
    )
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    with pytest.raises(PipelineError) as raised:
        compiled_as(float("nan"))(batch)
    assert str(raised.value).endswith(
        "(largest difference nan on the first batch, features up to 1); set backbone.compile: "
        "false or unset ATEN_CPU_CAPABILITY (=avx2)"
    )


def test_the_compiled_check_allows_5_percent_of_the_largest_feature():
    """Eager features [4, -2]: the bound is 0.05 * 4 + 0.001 = 0.201, on any feature."""
    eager = torch.tensor([4.0, -2.0])
    check_compiled(torch.tensor([4.2, -2.0]), eager, "trunk")  # 0.2 off: allowed
    check_compiled(torch.tensor([4.0, -1.81]), eager, "trunk")  # 0.19 off the smaller one
    with pytest.raises(
        PipelineError, match=r"difference 0.21 on the first batch, features up to 4\)"
    ):
        check_compiled(torch.tensor([4.0, -2.21]), eager, "trunk")
    with pytest.raises(PipelineError, match="difference inf"):
        check_compiled(torch.tensor([float("inf"), -2.0]), eager, "trunk")


def test_bfloat16_runs_the_backbone_under_bfloat16_autocast(monkeypatch):
    entered = []
    real_autocast = features_lib.torch.autocast

    def autocast(device_type, **kwargs):
        entered.append((device_type, kwargs))
        return real_autocast(device_type, **kwargs)

    monkeypatch.setattr(features_lib.torch, "autocast", autocast)
    batch = torch.zeros(1, 3, 2, 2, dtype=torch.uint8)
    prepare_model(recorder_backbone(), torch.device("cpu"), precision="float32")(batch)
    assert entered == []
    prepare_model(recorder_backbone(), torch.device("cpu"), precision="bfloat16")(batch)
    assert entered == [("cpu", {"dtype": torch.bfloat16})]


def test_the_device_auto_takes_the_gpu_when_there_is_one(monkeypatch):
    for available in (True, False):
        monkeypatch.setattr(devices_lib.torch.cuda, "is_available", lambda a=available: a)
        expected = "cuda" if available else "cpu"
        assert devices_lib.pick_device("auto", "train.device") == torch.device(expected)
        assert devices_lib.pick_device("cpu", "train.device") == torch.device("cpu")
    for key in ("train.device", "finetune.device", "--device"):  # the key at fault is named
        with pytest.raises(ParamsError) as raised:
            devices_lib.pick_device("cuda", key)
        assert str(raised.value) == f"{key}: cuda, but torch sees no GPU (use auto or cpu)"
    bb = load_params(REPO / "params.yaml").backbone
    with pytest.raises(ParamsError, match=r"^backbone.device: cuda, but torch sees no GPU"):
        ExtractSettings.from_params(replace(bb, device="cuda"), "raise")
    settings = ExtractSettings.from_params(replace(bb, device="auto"), "raise")
    assert settings.device == "cpu"  # resolved once, for the stage and the loop alike
    monkeypatch.setattr(devices_lib.torch.cuda, "is_available", lambda: True)
    assert devices_lib.pick_device("cuda", "train.device") == torch.device("cuda")
