"""Timing and memory helpers shared by the benchmarks."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator

import torch


def timed(fn: Callable[[], object]) -> float:
    """Wall-clock milliseconds of one call."""
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def interleaved_medians(arms: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median ms per arm; one warm-up call each, then the arms run in turn ``repeats`` times."""
    for fn in arms.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in arms}
    for _ in range(repeats):
        for name, fn in arms.items():
            times[name].append(timed(fn))
    return {k: statistics.median(v) for k, v in times.items()}


@contextlib.contextmanager
def saved_bytes() -> Iterator[list[int]]:
    """Count the bytes autograd saves for backward inside the block (unique storages).

    This is the activation memory of a training step, the part that differs between residual
    variants; the CPU allocator offers no peak counter, so this is what the benchmarks report.
    Yields a one-element list holding the running total.
    """
    seen: set[int] = set()
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total[0] += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total


def machine() -> dict[str, object]:
    """What the figures were measured on, including the load."""
    return {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "loadavg": os.getloadavg(),
    }
