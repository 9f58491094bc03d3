"""Measured peak memory of a stretch of work: the device's allocator peak on CUDA, the process's
resident set (sampled) on a CPU. Recorded with training runs beside the estimate made before them."""

from __future__ import annotations

import os
import threading

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int:
    """This process's resident set size now (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


class PeakMemory:
    """`with PeakMemory(device) as pm: ...` then `pm.peak` (bytes at the highest point) and
    `pm.added` (above what was in use at the start). CPU: RSS sampled every `every` seconds."""

    def __init__(self, device: torch.device, every: float = 0.02):
        self.device, self.every = torch.device(device), every
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def added(self) -> int:
        return max(0, self.peak - self.start)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = self.peak = torch.cuda.memory_allocated(self.device)
        else:
            self.start = self.peak = resident_bytes()
            self._thread = threading.Thread(target=self._sample, name="peak-memory", daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, resident_bytes())

    def __exit__(self, *exc) -> bool:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device))
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, resident_bytes())
        return False
