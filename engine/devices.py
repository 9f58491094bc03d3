"""Device and dtype choice: where a model runs and in which precision (`dtype="auto"` decides by
the hardware: bf16 on CUDA and on CPUs with native bf16, else fp32)."""

from __future__ import annotations

import contextlib
import contextvars
from pathlib import Path

import torch

from engine.errors import ModelLoadError


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 matmul (AVX512-BF16 or AMX-BF16).

    Without it PyTorch emulates bf16 and is several times *slower* than fp32
    (measured 6x slower on an AVX2-only EPYC), so `dtype="auto"` must not pick bf16 there.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} asked for, but CUDA is not available; use 'cpu' or 'auto'")
    return dev


DTYPE_NAMES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
               "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
_COMPUTE_DTYPE: contextvars.ContextVar[torch.dtype | None] = contextvars.ContextVar("compute_dtype", default=None)


@contextlib.contextmanager
def compute_dtype(dtype: str | torch.dtype | None):
    """Within the block `resolve_dtype("auto")` answers `dtype` (None or "auto": no change), so helpers that
    pick an autocast dtype on their own (engine.evaluate) compute in what the user asked for: `--dtype
    fp32` means fp32, not bf16 autocast on a CPU with native bf16."""
    token = _COMPUTE_DTYPE.set(None if dtype in (None, "auto") else resolve_dtype(dtype))
    try:
        yield
    finally:
        _COMPUTE_DTYPE.reset(token)


def resolve_dtype(dtype: str | torch.dtype = "auto", device: torch.device | None = None) -> torch.dtype:
    """`auto` -> bf16 on CUDA and on CPUs with native bf16, else fp32 (or the dtype set by `compute_dtype`)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    names = DTYPE_NAMES
    if dtype == "auto" and _COMPUTE_DTYPE.get() is not None:
        return _COMPUTE_DTYPE.get()
    if dtype == "auto":
        device = device or resolve_device("auto")
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_supports_bf16() else torch.float32
    if dtype not in names:
        raise ModelLoadError(f"unknown dtype {dtype!r}; valid: auto, source, {', '.join(sorted(names))}")
    return names[dtype]
