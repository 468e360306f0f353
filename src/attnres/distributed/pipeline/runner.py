"""One rank's side of a pipelined training step: its chunks' forwards and backwards, and the
point-to-point messages between them (``torch.distributed``).

A message is the residual state leaving a chunk (:mod:`~attnres.distributed.pipeline.state`) or
its gradient, less the blocks the receiving rank holds in its cross-stage cache, packed into one
``[n, B, T, d]`` tensor. Everything one step needs lives in its :class:`_Step`; the runner keeps
only what every step shares (chunks, layout, cache mode, process group).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from attnres.distributed.pipeline.layout import CACHE_MODES, PipelineLayout
from attnres.distributed.pipeline.schedule import Message, Op, forward_schedule, op_messages, schedule_units
from attnres.distributed.pipeline.split import PipelineChunk
from attnres.distributed.pipeline.state import state_from_tensors, state_template, state_tensors
from attnres.model import lm_loss


def pack(tensors: Sequence[Tensor]) -> Tensor:
    """One contiguous ``[n, B, T, d]`` message from ``n`` tensors ``[B, T, d]``.

    gloo sends only contiguous memory, and boundary gradients often are not (expanded zeros,
    transposed views), so every message is copied into a fresh buffer.
    """
    return torch.stack([t.detach() for t in tensors]).contiguous()  # [n, B, T, d]


def check_message(buf: Tensor, shape: tuple[int, ...], dtype: torch.dtype, message: Message) -> None:
    """Refuse a message the receiver's buffer (``shape``, ``dtype``) would not hold exactly.

    Receivers allocate from the chunks' parameter dtype and the layout, and a shorter message
    would arrive as garbage bytes (gloo accepts short receives); e.g. a residual scheme whose
    stream left the embedding's dtype under autocast would send bf16 activations to fp32 buffers.
    """
    if buf.dtype != dtype or tuple(buf.shape) != tuple(shape):
        raise RuntimeError(
            f"pipeline message {message} is {tuple(buf.shape)} {buf.dtype}, but the receiver expects "
            f"{tuple(shape)} {dtype}: activations must keep the chunks' parameter dtype (a residual "
            "scheme keeps its stream in the embedding's dtype, autocast or not: see "
            "attnres.residuals.base.to_stream)"
        )


@dataclass
class CommRecord:
    """One message: ``direction`` ``"fwd"``/``"bwd"`` over transition ``j`` (the link into chunk ``j``)."""

    direction: str
    transition: int
    microbatch: int
    tensors: int
    blocks: int
    elements: int
    bytes: int


@dataclass
class CommStats:
    """Every message this rank sent in one step; merge the ranks' records to get the whole pipeline."""

    records: list[CommRecord] = field(default_factory=list)


@dataclass
class _Step:
    """One step on this rank: its micro-batches, what its ops hand each other, and its messages."""

    tokens: tuple[Tensor, ...]  # M micro-batches [B/M, T]
    targets: tuple[Tensor, ...]
    like: Any  # a residual state of the scheme's type, for unflattening received tensors
    loss_sum: Tensor
    keep: bool  # grad mode: keep inputs and outputs for the backward
    act_shape: tuple[int, int, int]  # one micro-batch's [B/M, T, d]
    dtype: torch.dtype  # the chunks' parameter dtype: every message's
    device: torch.device
    stats: CommStats = field(default_factory=CommStats)  # every message this rank sent
    outgoing: list[tuple[int, Message, Tensor]] = field(default_factory=list)  # (chunk, message, buf) queued
    received: dict[Message, Tensor] = field(default_factory=dict)  # buffers of the last exchange
    cache: dict[int, list[Tensor]] = field(default_factory=dict)  # mb -> blocks leaving the latest chunk
    inputs: dict[tuple[int, int], list[Tensor]] = field(default_factory=dict)  # (chunk, mb) -> input leaves
    outputs: dict[tuple[int, int], Any] = field(default_factory=dict)  # (chunk, mb) -> outputs, or the loss
    local_grads: dict[tuple[int, int], list[Tensor]] = field(default_factory=dict)  # grads of cached blocks

    def take(self, message: Message) -> list[Tensor]:
        """The tensors of a message received by the last exchange."""
        return list(self.received.pop(message).unbind(0))


class PipelineRunner:
    """Runs one rank's chunks through a training step with point-to-point ``torch.distributed`` ops.

    Each communication unit's messages go out as one ``batch_isend_irecv`` (:func:`schedule_units`),
    so the interleaved schedule cannot deadlock on NCCL either. Construction is a collective (a
    barrier: NCCL requires the group's first collective to involve every rank, and the first batch
    of point-to-point messages does not); with NCCL, call ``torch.cuda.set_device`` first.

    Args:
        chunks: this rank's chunks, in virtual-stage order (``split_model(..., rank=rank)``).
        layout: the pipeline layout.
        cache: ``"off"``, ``"received"`` or ``"seen"`` (``attnres.distributed.pipeline``).
        group: process group of the ``pp`` ranks (default: the world).
        autocast: makes the context every chunk forward (and the loss) runs in, e.g.
            ``lambda: torch.autocast("cuda", dtype=torch.bfloat16)``; backwards run outside it.
            The messages keep the chunks' parameter dtype under autocast too: every residual
            scheme keeps its stream in the embedding's dtype (``attnres.residuals.base``).
    """

    def __init__(
        self,
        chunks: Sequence[PipelineChunk],
        layout: PipelineLayout,
        cache: str = "seen",
        group: dist.ProcessGroup | None = None,
        autocast: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
    ) -> None:
        if cache not in CACHE_MODES:
            raise ValueError(f"cache must be one of {CACHE_MODES}, got {cache!r}")
        self.layout, self.cache, self.group, self.autocast = layout, cache, group, autocast
        self.rank = dist.get_rank(group)
        if dist.get_world_size(group) != layout.pp:
            raise ValueError(
                f"pipeline has pp={layout.pp} stages but the process group has {dist.get_world_size(group)}"
            )
        self.chunks = {chunk.index: chunk for chunk in chunks}
        if sorted(self.chunks) != layout.chunks_of(self.rank):
            raise ValueError(
                f"rank {self.rank} must hold chunks {layout.chunks_of(self.rank)}, got {sorted(self.chunks)}"
            )
        dist.barrier(group)

    def _peer(self, chunk: int) -> int:
        return (
            dist.get_global_rank(self.group, self.layout.rank_of(chunk))
            if self.group is not None
            else self.layout.rank_of(chunk)
        )

    def _tag(self, step: _Step, message: Message) -> int:
        direction, transition, microbatch = message
        return ((direction == "bwd") * self.layout.n_chunks + transition) * len(step.tokens) + microbatch

    def _send(self, step: _Step, tensors: Sequence[Tensor], message: Message, dst_chunk: int) -> None:
        """Queue ``tensors`` as one message; it goes out with the unit's :meth:`_exchange`."""
        buf = pack(tensors)
        check_message(buf, (self._wire_tensors(message[1]), *step.act_shape), step.dtype, message)
        blocks = len(tensors) - 1 if self.layout.carries_blocks else 0
        direction, transition, microbatch = message
        step.stats.records.append(
            CommRecord(
                direction,
                transition,
                microbatch,
                len(tensors),
                blocks,
                buf.numel(),
                buf.numel() * buf.element_size(),
            )
        )
        step.outgoing.append((dst_chunk, message, buf))

    def _wire_tensors(self, transition: int) -> int:
        """``[B, T, d]`` tensors per message over ``transition``: the blocks not cached, the partial."""
        if not self.layout.carries_blocks:
            return 1
        return self.layout.blocks_out[transition - 1] + 1 - self.layout.known(transition, self.cache)

    def _exchange(self, step: _Step, unit: list[Op], next_unit: list[Op]) -> None:
        """Post ``unit``'s queued sends and ``next_unit``'s receives as one group, and wait for it.

        The sends must be the ones :func:`op_messages` plans for ``unit``, in order: the schedule's
        freedom from deadlock on NCCL, which matches a pair's messages in order, rests on it.
        """
        planned = [(chunk, msg) for op in unit for chunk, msg in op_messages(op, self.layout.n_chunks)[1]]
        sent = [(chunk, msg) for chunk, msg, _ in step.outgoing]
        if sent != planned:
            raise RuntimeError(f"pipeline sent {sent} where the plan has {planned}")
        p2p = [
            dist.P2POp(dist.isend, buf, self._peer(chunk), self.group, self._tag(step, msg))
            for chunk, msg, buf in step.outgoing
        ]
        for op in next_unit:
            for chunk, msg in op_messages(op, self.layout.n_chunks)[0]:
                # NaN-filled: a short receive shows
                buf = torch.full(
                    (self._wire_tensors(msg[1]), *step.act_shape),
                    float("nan"),
                    dtype=step.dtype,
                    device=step.device,
                )  # [n, B, T, d]
                step.received[msg] = buf
                p2p.append(dist.P2POp(dist.irecv, buf, self._peer(chunk), self.group, self._tag(step, msg)))
        if p2p:
            for work in dist.batch_isend_irecv(p2p):
                work.wait()
        step.outgoing = []

    def step(self, tokens: Tensor, targets: Tensor, n_microbatches: int) -> tuple[float, CommStats]:
        """Forward and backward of one batch; parameter gradients accumulate in the chunks.

        Every rank passes the same ``tokens``/``targets`` ``[B, T]`` (only chunk 0 reads the tokens,
        only the last chunk the targets). The loss is the mean over micro-batches of
        :func:`lm_loss`, which equals the full batch's loss, and is returned on every rank.
        """
        units = schedule_units(self.rank, self.layout.pp, self.layout.vpp, n_microbatches)
        return self._run(units, tokens, targets, n_microbatches)

    @torch.no_grad()
    def forward_loss(self, tokens: Tensor, targets: Tensor, n_microbatches: int) -> float:
        """The loss of one batch, forward only (evaluation); returned on every rank like :meth:`step`'s."""
        units = forward_schedule(self.rank, self.layout.pp, self.layout.vpp, n_microbatches)
        return self._run(units, tokens, targets, n_microbatches)[0]

    def _run(
        self, units: list[list[Op]], tokens: Tensor, targets: Tensor, n_microbatches: int
    ) -> tuple[float, CommStats]:
        """Execute the ops of ``units``; without grad mode nothing is kept for a backward."""
        M = n_microbatches
        if tokens.shape[0] % M:
            raise ValueError(f"batch size {tokens.shape[0]} is not divisible by {M} micro-batches")
        some_chunk = next(iter(self.chunks.values()))
        param = next(some_chunk.parameters())
        step = _Step(
            tokens=tokens.chunk(M),
            targets=targets.chunk(M),
            like=state_template(some_chunk.residual),
            loss_sum=torch.zeros((), dtype=torch.float64, device=param.device),  # NCCL: on the GPU
            keep=torch.is_grad_enabled(),
            act_shape=(tokens.shape[0] // M, tokens.shape[1], some_chunk.cfg.d_model),
            dtype=param.dtype,
            device=param.device,
        )
        self._exchange(step, [], units[0])
        for u, unit in enumerate(units):
            for kind, c, m in unit:
                (self._forward if kind == "F" else self._backward)(step, c, m)
            self._exchange(step, unit, units[u + 1] if u + 1 < len(units) else [])

        if step.inputs or step.outputs or step.local_grads or step.cache or step.received:
            raise RuntimeError("pipeline step left unconsumed state; the schedule is inconsistent")
        dist.broadcast(step.loss_sum, self._peer(self.layout.n_chunks - 1), self.group)
        return float(step.loss_sum), step.stats

    def _forward(self, step: _Step, c: int, m: int) -> None:
        """Chunk ``c`` on micro-batch ``m``: input from the wire and the cache, output queued to send."""
        layout, C = self.layout, self.layout.n_chunks
        if c == 0:
            leaves, inp = [], step.tokens[m]
        else:
            k = layout.known(c, self.cache)
            wire = step.take(("fwd", c, m))
            leaves = [t.detach().requires_grad_() for t in step.cache.get(m, [])[:k] + wire]
            inp = state_from_tensors(step.like, leaves)
        with self.autocast():
            out = self.chunks[c](inp)
            if c == C - 1:
                out = lm_loss(out, step.targets[m]) / len(step.tokens)
        if c == C - 1:
            step.loss_sum += out.detach().double()
            step.cache.pop(m, None)
        else:
            out = state_tensors(out)
            if c + layout.pp < C:  # this rank runs the micro-batch again: keep its blocks
                step.cache[m] = out[:-1]
            else:
                step.cache.pop(m, None)
            self._send(step, out[layout.known(c + 1, self.cache) :], ("fwd", c + 1, m), c + 1)
        if step.keep:  # for the backward
            step.inputs[c, m], step.outputs[c, m] = leaves, out

    def _backward(self, step: _Step, c: int, m: int) -> None:
        """Backward of chunk ``c`` on micro-batch ``m``; input gradients queued or kept for the cache."""
        layout = self.layout
        if c == layout.n_chunks - 1:
            step.outputs.pop((c, m)).backward()
        else:
            flat = step.outputs.pop((c, m))
            k_next = layout.known(c + 1, self.cache)
            grads: list[Tensor | None] = [None] * k_next + step.take(("bwd", c + 1, m))
            for i, g in enumerate(step.local_grads.pop((c, m), [])):  # from chunk c + P's cached reads
                grads[i] = g if grads[i] is None else grads[i] + g
            pairs = [(t, g) for t, g in zip(flat, grads, strict=True) if g is not None and t.requires_grad]
            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
        leaves = step.inputs.pop((c, m))
        if c > 0:
            in_grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]
            k = layout.known(c, self.cache)
            if k:
                step.local_grads[c - layout.pp, m] = in_grads[:k]
            self._send(step, in_grads[k:], ("bwd", c, m), c - 1)
