"""Dtypes of the depth read (SPEC §2): statistics in fp32, the result in the stream dtype.

Two rules, one function each:

* :func:`stats_dtype`: the dtype the statistics (RMS, logits, softmax, weighted sum) run in.
* :func:`no_autocast`: every fast depth-read op runs with autocast off. Under
  ``torch.autocast`` a matrix product of two fp32 tensors runs in bf16/fp16, which would
  silently compute the logits ``v · q`` in low precision; the ops cast explicitly instead
  (sources to :func:`stats_dtype` where they are read, results to the stream dtype), so they
  give the same dtypes with autocast on or off. The backward passes of the ops' autograd
  functions are decorated too: ``loss.backward()`` called inside an autocast region would
  otherwise run them under autocast (``torch.amp.custom_bwd`` restores the *forward's* autocast
  state, which is "off" here, but takes one fixed device type; this works for any).

Which dtype the stream has is the residual scheme's business (``attnres.residuals.base``): the ops
take sources of one dtype and return the result in it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch

P = ParamSpec("P")
R = TypeVar("R")

#: device types whose autocast state the depth-read ops switch off (those attnres runs on)
AUTOCAST_DEVICES = ("cpu", "cuda")


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics run in: fp32 for fp32 and lower precision, fp64 for fp64."""
    return torch.promote_types(dtype, torch.float32)


def no_autocast(fn: Callable[P, R]) -> Callable[P, R]:
    """Run ``fn`` with autocast disabled on every device type where it is enabled now.

    Free outside autocast (two flag reads); inside, one context manager per enabled device. Plain
    ``torch.autocast`` / ``nullcontext`` managers, not an ``ExitStack``: ``torch.compile`` traces
    these, while an ``ExitStack`` broke the graph at every depth read under mixed precision.
    """

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        cpu, cuda = (torch.is_autocast_enabled(device) for device in AUTOCAST_DEVICES)
        if not (cpu or cuda):
            return fn(*args, **kwargs)
        off = contextlib.nullcontext
        with (
            torch.autocast("cpu", enabled=False) if cpu else off(),
            torch.autocast("cuda", enabled=False) if cuda else off(),
        ):
            return fn(*args, **kwargs)

    return run
