"""`dtype: auto` picks bf16 only where the hardware runs it natively; explicit bf16 on an AVX2 CPU warns once.

Offline (HF_HUB_OFFLINE=1) through tests/conftest.py; the hardware is monkeypatched, so this runs anywhere."""

import dataclasses
import json
import warnings

import pytest
import torch

from dlmoe import precision
from dlmoe.cli import build_parser, main
from dlmoe.config import DTYPES, TrainConfig
from dlmoe.precision import PRECISIONS, HardwareInfo, Precision, hardware_info, native_bf16, resolve_precision

AVX2 = HardwareInfo(
    cpu_capability="AVX2",
    cpu_avx512_bf16=False,
    cpu_amx=False,
    cpu_native_bf16=False,
    threads=2,
    cuda=False,
    cuda_device=None,
    cuda_bf16=False,
)
AMX = dataclasses.replace(AVX2, cpu_capability="AVX512", cpu_amx=True, cpu_native_bf16=True)
AVX512_BF16 = dataclasses.replace(AVX2, cpu_capability="AVX512", cpu_avx512_bf16=True, cpu_native_bf16=True)
AVX2_A100 = dataclasses.replace(AVX2, cuda=True, cuda_device="NVIDIA A100", cuda_bf16=True)
AVX2_T4 = dataclasses.replace(AVX2, cuda=True, cuda_device="Tesla T4", cuda_bf16=False)


@pytest.fixture
def machine(monkeypatch):
    """Pretend to run on the given hardware; the once-per-process warning flag starts unset."""
    monkeypatch.setattr(precision, "_warned_emulated_bf16", False)

    def use(info: HardwareInfo) -> None:
        monkeypatch.setattr(precision, "hardware_info", lambda: info)

    return use


def test_auto_is_fp32_on_a_cpu_without_native_bf16(machine) -> None:
    machine(AVX2)
    got = resolve_precision("auto", "cpu")
    assert (got.name, got.dtype, got.requested) == ("fp32", torch.float32, "auto")
    assert got.reason == "auto: cpu has no native bf16 (AVX2; no AVX512-BF16/AMX) -> fp32"
    assert got.as_dict() == {"requested": "auto", "dtype": "fp32", "reason": got.reason}
    assert not native_bf16("cpu") and not native_bf16(torch.device("cpu"))


@pytest.mark.parametrize("info, unit", [(AMX, "AMX"), (AVX512_BF16, "AVX512-BF16")], ids=["amx", "avx512_bf16"])
def test_auto_is_bf16_on_a_cpu_with_native_bf16(machine, info: HardwareInfo, unit: str) -> None:
    machine(info)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # native: no warning
        got = resolve_precision("auto", "cpu")
        assert resolve_precision("bf16", "cpu").dtype == torch.bfloat16
    assert (got.name, got.dtype) == ("bf16", torch.bfloat16)
    assert unit in got.reason and got.reason.endswith("-> bf16")
    assert resolve_precision("fp32", "cpu").dtype == torch.float32  # explicit fp32 is always fp32


def test_auto_on_cuda_follows_the_gpu(machine) -> None:
    machine(AVX2_A100)
    got = resolve_precision("auto", "cuda")
    assert got.name == "bf16" and "NVIDIA A100" in got.reason
    assert resolve_precision("auto", "cpu").name == "fp32"  # the host CPU is judged on its own
    machine(AVX2_T4)
    assert resolve_precision("auto", torch.device("cuda", 0)).name == "fp32"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the emulation warning is about CPUs
        assert resolve_precision("bf16", "cuda").name == "bf16"


def test_explicit_bf16_on_an_avx2_cpu_is_honoured_and_warns_once(machine) -> None:
    machine(AVX2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # count our warnings, not Python's deduplication
        first = resolve_precision("bf16", "cpu")
        second = resolve_precision("bf16", torch.device("cpu"))
    assert first == second and first.dtype == torch.bfloat16 and first.requested == "bf16"
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "emulated" in message and "AVX2" in message and "70x" in message and "auto or fp32" in message


def test_bad_values_are_refused_clearly(machine) -> None:
    machine(AVX2)
    with pytest.raises(ValueError, match=r"dtype must be one of \('auto', 'bf16', 'fp32'\), got 'fp16'"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ValueError, match=r"device must be one of \('cpu', 'cuda'\), got 'meta'"):
        resolve_precision("auto", "meta")
    with pytest.raises(ValueError, match="train.dtype"):
        TrainConfig(dtype="bfloat16")


def test_train_config_default_is_auto() -> None:
    assert TrainConfig().dtype == "auto" and DTYPES == PRECISIONS == ("auto", "bf16", "fp32")
    assert Precision("auto", "fp32", "x").dtype == torch.float32


def test_hardware_info_describes_this_machine() -> None:
    info = hardware_info()
    assert info == hardware_info()  # the hardware is probed once
    assert info.cpu_capability == torch.backends.cpu.get_cpu_capability()
    assert info.cpu_native_bf16 == (info.cpu_avx512_bf16 or info.cpu_amx)
    assert info.cuda == torch.cuda.is_available() and (info.cuda_device is not None) == info.cuda
    assert info.threads >= 1 and set(info.as_dict()) == {f.name for f in dataclasses.fields(HardwareInfo)}
    before = torch.get_num_threads()
    try:  # threads are a setting, read when asked (a run records what it trains with)
        torch.set_num_threads(1)
        assert hardware_info().threads == 1
    finally:
        torch.set_num_threads(before)


def test_info_system_needs_no_config(machine, capsys) -> None:
    machine(AVX2_A100)
    assert main(["info", "--system"]) == 0
    system = json.loads(capsys.readouterr().out)
    assert system.items() >= AVX2_A100.as_dict().items()
    assert system["auto"]["cpu"] == resolve_precision("auto", "cpu").as_dict()
    assert system["auto"]["cuda"]["dtype"] == "bf16"
    machine(AVX2)
    assert main(["info", "--system"]) == 0
    assert set(json.loads(capsys.readouterr().out)["auto"]) == {"cpu"}  # no GPU, no cuda entry


def test_info_adds_the_system_to_its_output(machine, capsys) -> None:
    machine(AVX2)
    assert main(["info", "model.num_layers=1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"]["train"]["dtype"] == "auto" and out["config"]["model"]["num_layers"] == 1
    assert out["system"]["auto"]["cpu"]["dtype"] == "fp32" and out["system"]["cpu_capability"] == "AVX2"


def test_clis_default_to_auto() -> None:
    parser = build_parser()
    assert parser.parse_args(["sample", "--run", "r"]).dtype == "auto"
    assert parser.parse_args(["sample", "--run", "r", "--dtype", "keep"]).dtype == "keep"
    assert parser.parse_args(["eval", "--run", "r"]).dtype == "auto"
    assert parser.parse_args(["convert", "c", "--out", "o"]).dtype == "keep"  # a storage dtype: kept by default
    assert parser.parse_args(["convert", "c", "--out", "o", "--dtype", "auto"]).dtype == "auto"
