"""Timing and memory helpers shared by the benchmarks."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TypeVar

import torch

K = TypeVar("K")
V = TypeVar("V")


def timed(fn: Callable[[], object]) -> float:
    """Wall-clock milliseconds of one call."""
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def emit(text: str, result: dict, as_json: bool) -> None:
    """A benchmark's output: the human ``text``, then with ``--json`` the result as one JSON line."""
    print(text)
    if as_json:
        print(json.dumps(result))


def take_turns(
    arms: Mapping[K, Callable[[], V]], rounds: int, on_round: Callable[[int], object] | None = None
) -> dict[K, list[V]]:
    """Call every arm once per round, in turn, for ``rounds`` rounds; each arm's results in call order.

    This is how every benchmark interleaves its arms, so a burst of machine load hits them alike.
    ``on_round(r)`` runs before round ``r`` (a progress line, say).
    """
    results: dict[K, list[V]] = {k: [] for k in arms}
    for r in range(rounds):
        if on_round is not None:
            on_round(r)
        for name, fn in arms.items():
            results[name].append(fn())
    return results


def interleaved_medians(arms: Mapping[K, Callable[[], object]], repeats: int) -> dict[K, float]:
    """Median ms per arm; one warm-up call each, then the arms run in turn ``repeats`` times."""
    for fn in arms.values():
        fn()
    times = take_turns({k: functools.partial(timed, fn) for k, fn in arms.items()}, repeats)
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


@dataclass(frozen=True)
class StepMemory:
    """Bytes the CPU allocator handed out, and had not yet freed, during one forward + backward.

    Attributes:
        kept: live when the backward starts: what the forward keeps for it (saved activations,
            checkpoint inputs, the logits and the loss).
        peak: the most live at any moment of the forward and backward, gradients included.
    """

    kept: int
    peak: int


def step_memory(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> StepMemory:
    """Measure one training forward and backward of ``model`` with ``torch.profiler``'s memory events.

    Every allocation and free inside the profiled block is an event with its byte count, so their
    running sum is the memory allocated by the step and still alive: exact and independent of the
    machine's load, unlike the process's resident size, which the allocator's caching blurs. It
    counts all tensors, including those a checkpoint keeps as inputs, which
    :func:`saved_bytes` (autograd's saved tensors only) cannot see. Gradients are set to ``None``
    first, so their allocation is part of the peak.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    from attnres.model import lm_loss

    model.zero_grad(set_to_none=True)
    marker = "attnres::backward"
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = lm_loss(model(inputs), targets)
        with record_function(marker):
            loss.backward()
        del loss
    events = prof.profiler.kineto_results.events()
    backward_start = min(e.start_ns() for e in events if e.name() == marker)
    live = peak = 0
    kept = None
    for start, nbytes in sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"):
        if kept is None and start >= backward_start:
            kept = live
        live += nbytes
        peak = max(peak, live)
    model.zero_grad(set_to_none=True)
    return StepMemory(kept=live if kept is None else kept, peak=peak)


def machine(load_before: tuple[float, float, float] | None = None) -> dict[str, object]:
    """What the figures were measured on, including the load: the one place that gathers it.

    Two formats, kept apart so that committed results keep their keys:

    - without ``load_before`` (``bench ops``, ``train``, ``memory``): ``platform``, ``cpu_count``,
      ``torch``, ``threads`` and ``loadavg``, the load now;
    - with ``load_before``, the ``os.getloadavg()`` taken when the run began (``bench infer``):
      ``platform``, ``processor``, ``torch``, ``threads``, ``python``, ``cpus``, and the load as
      ``loadavg_before`` and ``loadavg_after``.
    """
    now = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "loadavg": os.getloadavg(),
    }
    if load_before is None:
        return now
    return {
        "platform": now["platform"],
        "processor": platform.processor() or platform.machine(),
        "torch": now["torch"],
        "threads": now["threads"],
        "python": platform.python_version(),
        "cpus": now["cpu_count"],
        "loadavg_before": load_before,
        "loadavg_after": now["loadavg"],
    }
