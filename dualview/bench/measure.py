"""Timing, memory and FLOP counting for the benchmark: synchronised, warm-up excluded, medians."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sm_clock_mhz(device: torch.device) -> int | None:
    """The GPU's SM clock just now (via NVML), to tell throttling from code in the results; None on CPU."""
    if device.type != "cuda":
        return None
    try:
        return int(torch.cuda.clock_rate(device))
    except Exception:  # NVML missing or not permitted: the clock is only a diagnostic
        return None


@dataclass
class Timing:
    median_s: float
    min_s: float
    max_s: float
    repeats: int


def time_it(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> Timing:
    """Wall time of ``fn()`` over ``repeats`` runs after ``warmup`` runs, device synchronised."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return Timing(statistics.median(times), min(times), max(times), repeats)


def time_interleaved(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int,
                     repeats: int) -> dict[str, Timing]:
    """Like :func:`time_it` for several variants, run in turn within each repeat, so that a slow
    spell of a shared machine hits them all alike rather than whichever ran then."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: Timing(statistics.median(t), min(t), max(t), repeats) for name, t in times.items()}


class PeakMemory:
    """Peak memory of a block: ``torch.cuda.max_memory_allocated`` on GPU; on CPU the process's
    peak RSS (VmHWM), reset before the block through /proc/self/clear_refs after handing freed
    heap memory back to the system (``malloc_trim``), so that memory freed earlier and reused
    inside the block still counts. ``peak_bytes`` is the whole process's (weights included),
    ``extra_bytes`` what the block added above what was in use when it started."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start_bytes = 0
        self.peak_bytes = 0

    @property
    def extra_bytes(self) -> int:
        return max(self.peak_bytes - self.start_bytes, 0)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
        else:
            _malloc_trim()
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:  # not Linux: the peak then covers the whole process so far
                pass
            self.start_bytes = _vm_status("VmRSS:")
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak_bytes = _vm_hwm()


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _vm_status(key: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _vm_hwm() -> int:
    peak = _vm_status("VmHWM:")
    if peak:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def dem_flops(batch: int, grid: tuple[int, int], tokens: int, dim: int, directions: int = 2,
              fused_tokens: int | None = None) -> int:
    """Multiply-adds x 2 of one DEM forward (attention block per direction and sub-image:
    four D x D projections over T tokens, QK^T and AV over T x T; plus the two fusion FFNs over
    ``fused_tokens`` per image, ``DEM.fused_tokens``: all R*C*T unless the resampling samples)."""
    seqs = batch * grid[0] * grid[1] * directions
    attention = seqs * (4 * 2 * tokens * dim * dim + 2 * 2 * tokens * tokens * dim)
    hidden = max(dim // 16, 1)
    fused = grid[0] * grid[1] * tokens if fused_tokens is None else fused_tokens
    ffn = 2 * batch * fused * 2 * (dim * hidden + hidden * dim // 2)
    return attention + ffn


def matmul_flops_per_s(m: int, k: int, n: int, device: torch.device, dtype: torch.dtype, repeats: int) -> float:
    """Achieved FLOP/s of one (m, k) @ (k, n) matmul on this device and dtype."""
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    t = time_it(lambda: a @ b, device, warmup=2, repeats=repeats)
    return 2 * m * k * n / t.median_s


def copy_bandwidth(fn: Callable[[], object], nbytes: int, device: torch.device, repeats: int) -> float:
    """Bytes per second of ``fn`` counting ``nbytes`` read plus ``nbytes`` written."""
    t = time_it(fn, device, warmup=2, repeats=repeats)
    return 2 * nbytes / t.median_s
