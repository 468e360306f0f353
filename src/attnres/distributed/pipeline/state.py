"""A residual state as the tensors that cross a pipeline chunk boundary, and back.

What crosses is a state's sources, and nothing derived from them: for Block/Full AttnRes the
completed blocks ``b_0 … b_g`` then the live partial sum; for PreNorm and the other schemes whose
state is one tensor, that tensor. The receiving chunk rebuilds what its reads derive from the
sources (the fused read's per-source ``rstd``) with the scheme's own ``resume``.

The residual states have no ``tensors()`` / ``from_tensors()`` of their own yet: that is the typed
residual state of issue 14 item 2. Until then this module is the one place in the pipeline that
knows what a state holds, and it knows it by structure (:class:`BlockState`), not by class, so the
pipeline imports no residual state class.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from attnres.ops.dispatch import use_impl


@runtime_checkable
class BlockState(Protocol):
    """A residual state of completed blocks and a live partial sum (Block/Full AttnRes).

    Its class must build a state from ``blocks`` and ``partial`` alone (every other field
    defaulted), which is what a chunk receives.
    """

    blocks: tuple[Tensor, ...]  # completed blocks b_0 … b_g, each [B, T, d]
    partial: Tensor  # the live partial sum [B, T, d]
    impl: str  # the depth-read implementation its reads run


def state_tensors(state: Any) -> list[Tensor]:
    """The tensors ``[B, T, d]`` a residual state ships as: completed blocks, then the partial/hidden."""
    if isinstance(state, BlockState):
        return [*state.blocks, state.partial]
    if isinstance(state, Tensor):
        return [state]
    raise ValueError(  # a configuration the pipeline refuses, reported like the others
        f"pipeline parallelism supports residual states that are a DepthState (block, full) or one "
        f"tensor (prenorm and friends); got {type(state).__name__}"
    )


def state_from_tensors(like: Any, tensors: Sequence[Tensor]) -> Any:
    """Inverse of :func:`state_tensors`: a state of ``like``'s kind holding only ``tensors``."""
    if isinstance(like, BlockState):
        return type(like)(blocks=tuple(tensors[:-1]), partial=tensors[-1])
    (hidden,) = tensors
    return hidden


def state_template(scheme: nn.Module) -> Any:
    """A throw-away state of ``scheme``'s kind: the ``like`` of :func:`state_from_tensors`."""
    # Why use_impl: the scheme chooses its state's kind from the read implementation of the
    # forward (with no grads ``auto`` makes a stacked state, which does not ship); the reference
    # read's state is the kind that ships. A read strategy chosen outside the scheme (issue 14
    # item 2) would make this a plain argument.
    with use_impl("reference"):
        return scheme.init_state(torch.zeros(1))
