"""Training precision (``train.precision``): autocast, the fp16 gradient scaler, bf16 weights.

The names are litgpt's:

=============  =========================================================================
``fp32``       everything in fp32 (the default)
``bf16-mixed`` fp32 weights and optimiser; forward and loss under ``torch.autocast(bf16)``
``fp16-mixed`` as ``bf16-mixed`` with fp16, plus a ``torch.amp.GradScaler`` (fp16's range is too
               narrow for unscaled gradients): the loss is scaled before the backward, the
               gradients unscaled before clipping, and a step whose gradients overflowed is
               skipped while the scale backs off
``bf16-true``  the model cast to bf16 (``model.to(torch.bfloat16)``): weights, optimiser state
               and activations in bf16, no autocast
=============  =========================================================================

Under mixed precision the residual stream stays fp32 (the embedding's dtype; see
``attnres.residuals.base``) and depth reads compute their statistics in fp32 whatever the mode
(``attnres.ops.precision``); the matrix products of the sublayers and the LM head are what run in
bf16/fp16. ``fp16-mixed`` always has its scaler: no setting trains fp16 without one.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor, nn

from attnres.storage.config import PRECISIONS
from attnres.train.optim import OptimizerGroup

_AUTOCAST = {"bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}


def check_precision_supported(precision: str, device: torch.device) -> None:
    """Raise a clear error when ``device`` cannot run ``precision`` (one of :data:`PRECISIONS`).

    bf16 needs a CUDA device that supports it (``torch.cuda.is_bf16_supported()``, Ampere or later);
    CPUs run every mode (torch's CPU autocast takes bf16 and fp16, and its gradient scaler runs on
    CPU), if slowly where the CPU lacks native bf16/fp16 arithmetic.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision={precision!r} is not one of: {', '.join(PRECISIONS)}")
    if precision.startswith("bf16") and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(
            f"train.precision={precision} needs bf16, which this CUDA device "
            f"({torch.cuda.get_device_name(device)}) does not support; use one of: fp32, fp16-mixed"
        )


class Precision:
    """One run's precision on one device: what wraps the forward, the backward and the step.

    Args:
        precision: one of :data:`PRECISIONS`.
        device: the device the model trains on.

    Attributes:
        scaler: the gradient scaler (``fp16-mixed`` only, else ``None``).
    """

    def __init__(self, precision: str, device: torch.device) -> None:
        check_precision_supported(precision, device)
        self.name, self.device = precision, device
        self.autocast_dtype = _AUTOCAST.get(precision)
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16-mixed" else None

    def prepare(self, model: nn.Module) -> nn.Module:
        """``model`` with the weight dtype of this precision (bf16 for ``bf16-true``; else as is)."""
        return model.to(torch.bfloat16) if self.name == "bf16-true" else model

    def autocast(self) -> AbstractContextManager[Any]:
        """The context a forward and its loss run in: autocast for ``*-mixed``, nothing otherwise."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def backward(self, loss: Tensor) -> None:
        """``loss.backward()``, scaled by the gradient scaler when there is one."""
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def unscale(self, optimizer: OptimizerGroup) -> None:
        """Divide the gradients by the loss scale (before clipping); nothing without a scaler."""
        if self.scaler is not None:
            for opt in optimizer.optimizers:
                self.scaler.unscale_(opt)

    def step(self, optimizer: OptimizerGroup) -> None:
        """The optimiser step; with a scaler, skipped if any gradient overflowed, then the scale updated."""
        if self.scaler is None:
            optimizer.step()
            return
        for opt in optimizer.optimizers:
            self.scaler.step(opt)
        self.scaler.update()

    def loss_scale(self) -> float | None:
        """The gradient scaler's current scale (``None`` without one)."""
        return None if self.scaler is None else float(self.scaler.get_scale())

    def state_dict(self) -> dict[str, Any]:
        """The scaler's state (floats and ints: loads with ``torch.load(weights_only=True)``); ``{}``."""
        return {} if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (an empty state leaves a fresh scaler, as a new run has)."""
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
