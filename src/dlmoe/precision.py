"""Which floating-point precision to compute in, chosen from what the hardware runs fast.

bf16 is only a speed-up where the hardware has it: CUDA GPUs with native bf16 (Ampere and newer)
and CPUs with AVX512-BF16 or AMX. On an AVX2-only CPU (most laptops and CI machines) bf16 matmuls
are emulated and about 70x slower than fp32 (1024^3: 0.5 vs 36 GFLOP/s), so `dtype: auto` picks
fp32 there. Imports only torch and the standard library (`dlmoe.config` imports it).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import asdict, dataclass

import torch

from dlmoe.vocab import PRECISIONS

DEVICE_TYPES = ("cpu", "cuda")
_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_warned_emulated_bf16 = False  # the emulated-bf16 warning is given once per process


@dataclass(frozen=True)
class HardwareInfo:
    """What this machine supports, as torch sees it (the facts `auto` decides from)."""

    cpu_capability: str  # torch.backends.cpu.get_cpu_capability(): "AVX2", "AVX512", ...
    cpu_avx512_bf16: bool
    cpu_amx: bool
    cpu_native_bf16: bool  # AVX512-BF16 or AMX
    threads: int  # torch.get_num_threads()
    cuda: bool
    cuda_device: str | None  # torch.cuda.get_device_name(0)
    cuda_bf16: bool  # native bf16 on CUDA device 0 (emulation not counted)

    def as_dict(self) -> dict:
        return asdict(self)


def hardware_info() -> HardwareInfo:
    """This machine's `HardwareInfo`: the hardware probed once per process, the thread count as set now."""
    return HardwareInfo(**_probe(), threads=torch.get_num_threads())


@functools.cache
def _probe() -> dict:
    avx512_bf16 = bool(torch.cpu._is_avx512_bf16_supported())
    amx = bool(torch.cpu._is_amx_tile_supported())
    cuda = torch.cuda.is_available()
    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_avx512_bf16": avx512_bf16,
        "cpu_amx": amx,
        "cpu_native_bf16": avx512_bf16 or amx,
        "cuda": cuda,
        "cuda_device": torch.cuda.get_device_name(0) if cuda else None,
        "cuda_bf16": cuda and _cuda_native_bf16(),
    }


def _cuda_native_bf16() -> bool:
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch before `including_emulation`
        return bool(torch.cuda.is_bf16_supported())


def _device_type(device: torch.device | str) -> str:
    kind = torch.device(device).type
    if kind not in DEVICE_TYPES:
        raise ValueError(f"device must be one of {DEVICE_TYPES}, got {str(device)!r}")
    return kind


def native_bf16(device: torch.device | str) -> bool:
    """True where bf16 matmuls run natively (fast) on `device`'s kind of hardware."""
    info = hardware_info()
    return info.cuda_bf16 if _device_type(device) == "cuda" else info.cpu_native_bf16


@dataclass(frozen=True)
class Precision:
    """A resolved precision: what was asked, what it became and why (for logs and bench rows)."""

    requested: str  # "auto" | "bf16" | "fp32"
    name: str  # "bf16" | "fp32"
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.name]

    def as_dict(self) -> dict:
        return {"requested": self.requested, "dtype": self.name, "reason": self.reason}


def resolve_precision(requested: str, device: torch.device | str) -> Precision:
    """`auto` → bf16 where `device` runs it natively, else fp32; `bf16` / `fp32` are honoured
    (bf16 on a CPU without native bf16 warns once per process: it is emulated and far slower)."""
    if requested not in PRECISIONS:
        raise ValueError(f"dtype must be one of {PRECISIONS}, got {requested!r}")
    kind = _device_type(device)
    native = native_bf16(kind)
    why = _why(kind, native)
    if requested == "fp32":
        return Precision(requested, "fp32", "fp32 requested")
    if requested == "bf16":
        if kind == "cpu" and not native:
            _warn_emulated_bf16()
        return Precision(requested, "bf16", f"bf16 requested ({why})")
    return Precision(requested, "bf16" if native else "fp32", f"auto: {why} -> {'bf16' if native else 'fp32'}")


def _why(kind: str, native: bool) -> str:
    info = hardware_info()
    if kind == "cuda":
        device = info.cuda_device or "cuda"
        return f"cuda ({device}) has native bf16" if native else f"cuda ({device}) has no native bf16"
    if native:
        units = " and ".join(u for u, ok in (("AVX512-BF16", info.cpu_avx512_bf16), ("AMX", info.cpu_amx)) if ok)
        return f"cpu has native bf16 ({info.cpu_capability}; {units})"
    return f"cpu has no native bf16 ({info.cpu_capability}; no AVX512-BF16/AMX)"


def _warn_emulated_bf16() -> None:
    global _warned_emulated_bf16
    if _warned_emulated_bf16:
        return
    _warned_emulated_bf16 = True
    capability = hardware_info().cpu_capability
    warnings.warn(
        f"bf16 requested on a CPU without native bf16 ({capability}; no AVX512-BF16/AMX): bf16 matmuls are "
        "emulated here, roughly ~70x slower than fp32; use dtype auto or fp32",
        stacklevel=3,
    )
