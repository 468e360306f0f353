"""Pipeline parallelism with AttnRes cross-stage caching (SPEC §6, paper §4.1).

The model stays single-device code. :func:`split_model` cuts a full :class:`Transformer` into
``C = pp * vpp`` chunks from the outside: chunk ``c`` owns a contiguous range of ``model.sublayers``
(plus ``embed`` on chunk 0, ``norm`` and ``lm_head`` on chunk ``C-1``), and the rows of the residual
scheme's per-read-site parameters (``query[l]``, ``key_gain[l]``) for the read sites it executes.
Everything else is deleted. Chunks are placed in a loop: chunk ``c`` lives on rank ``c % pp``.

What crosses a chunk boundary is the residual state. For Block/Full AttnRes that is the completed
blocks ``b_0 … b_g`` plus the live partial sum; for PreNorm it is one hidden tensor.

Cross-stage caching (``cache``):

``"off"``
    every transition sends all completed blocks plus the partial (SPEC Eq. 7).
``"received"``
    a rank keeps, per micro-batch, the blocks it has *received*; a transition into chunk ``c`` skips
    the blocks that entered chunk ``c - pp``. This is the paper's accounting (SPEC Eq. 8).
``"seen"``
    a rank also keeps the blocks it sealed itself in chunk ``c - pp``, so it is never sent its own
    blocks back. Strictly fewer bytes than ``"received"`` once ``vpp > 1``.

The backward pass mirrors the forward: a gradient crosses exactly the links its block crossed,
in reverse. The gradient of a block a chunk took from its rank's cache is accumulated on that rank
and added, once, to the output gradient of the chunk that put it in the cache.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from attnres.model import Transformer, lm_loss
from attnres.ops.dispatch import select_impl, use_impl
from attnres.residuals.attnres import DepthState

CACHE_MODES = ("off", "received", "seen")


def _flatten(state: Any) -> list[Tensor]:
    """The tensors a residual state consists of: completed blocks, then the live partial/hidden."""
    if isinstance(state, DepthState):
        return [*state.blocks, state.partial]
    if isinstance(state, Tensor):
        return [state]
    raise ValueError(  # a configuration the pipeline refuses, reported like the others
        f"pipeline parallelism supports residual states that are a DepthState (block, full) or one "
        f"tensor (prenorm and friends); got {type(state).__name__}"
    )


def _unflatten(like: Any, tensors: Sequence[Tensor]) -> Any:
    """Inverse of :func:`_flatten`: a state of ``like``'s type from its tensors."""
    if isinstance(like, DepthState):
        return DepthState(blocks=tuple(tensors[:-1]), partial=tensors[-1])
    (hidden,) = tensors
    return hidden


def even_bounds(n_sublayers: int, n_chunks: int) -> tuple[int, ...]:
    """Sublayer boundaries ``[0, …, L]`` of ``n_chunks`` contiguous chunks; sizes differ by at most 1."""
    if n_chunks > n_sublayers:
        raise ValueError(
            f"the model has {n_sublayers} sublayers (2 per layer) but pp * vpp = {n_chunks} pipeline "
            "chunks; every chunk needs at least one sublayer: lower --parallel.pp / --parallel.vpp "
            "or raise model.n_layers"
        )
    base, extra = divmod(n_sublayers, n_chunks)
    bounds = [0]
    for c in range(n_chunks):
        bounds.append(bounds[-1] + base + (c < extra))
    return tuple(bounds)


@dataclass(frozen=True)
class PipelineLayout:
    """Where the sublayers and the blocks fall on the ``C = pp * vpp`` chunks.

    Attributes:
        pp: physical stages ``P`` (ranks).
        vpp: virtual stages ``V`` per rank.
        bounds: ``C + 1`` sublayer indices; chunk ``c`` owns sublayers ``bounds[c] … bounds[c+1]-1``.
        blocks_in: per chunk, completed blocks in the state entering it (0 for chunk 0).
        blocks_out: per chunk, completed blocks in the state leaving it.
        carries_blocks: whether the residual state has blocks (AttnRes) or is one tensor.
    """

    pp: int
    vpp: int
    bounds: tuple[int, ...]
    blocks_in: tuple[int, ...]
    blocks_out: tuple[int, ...]
    carries_blocks: bool

    @property
    def n_chunks(self) -> int:
        """``C = pp * vpp``."""
        return self.pp * self.vpp

    def rank_of(self, chunk: int) -> int:
        """Loop placement: chunk ``c`` runs on rank ``c % pp``."""
        return chunk % self.pp

    def chunks_of(self, rank: int) -> list[int]:
        """The chunks on ``rank``, in virtual-stage order."""
        return list(range(rank, self.n_chunks, self.pp))

    def known(self, chunk: int, cache: str) -> int:
        """How many leading blocks the rank of ``chunk`` already holds when the state arrives."""
        if cache not in CACHE_MODES:
            raise ValueError(f"cache must be one of {CACHE_MODES}, got {cache!r}")
        if cache == "off" or chunk < self.pp or not self.carries_blocks:
            return 0
        previous = chunk - self.pp  # the same rank's previous chunk for this micro-batch
        return self.blocks_in[previous] if cache == "received" else self.blocks_out[previous]

    def sent_blocks(self, chunk: int, cache: str) -> int:
        """Blocks sent over the link into ``chunk`` (besides the partial), per micro-batch and token."""
        return self.blocks_out[chunk - 1] - self.known(chunk, cache)


def make_layout(
    model: Transformer, pp: int, vpp: int = 1, bounds: Sequence[int] | None = None
) -> PipelineLayout:
    """Split ``model``'s sublayers over ``pp * vpp`` chunks (evenly unless ``bounds`` is given).

    Block counts come from running the residual scheme's own bookkeeping (``init_state`` and
    ``update``) on a one-token stand-in, so the layout follows whatever sealing rule the scheme has.
    """
    if pp < 1 or vpp < 1:
        raise ValueError(f"--parallel.pp and --parallel.vpp must be >= 1, got pp={pp}, vpp={vpp}")
    L, C = model.cfg.n_sublayers, pp * vpp
    bounds = tuple(bounds) if bounds is not None else even_bounds(L, C)
    if len(bounds) != C + 1 or bounds[0] != 0 or bounds[-1] != L:
        raise ValueError(f"bounds must be {C + 1} sublayer indices from 0 to {L}, got {bounds}")
    if any(b >= e for b, e in itertools.pairwise(bounds)):
        raise ValueError(f"every pipeline chunk needs at least one sublayer; bounds {bounds} leave one empty")
    if C > 1 and model.cfg.tie_embeddings:
        raise ValueError(
            "tied embeddings put embed and lm_head on different pipeline ranks; "
            "set model.tie_embeddings=false to use pipeline parallelism"
        )
    scheme = model.residual
    weight = model.embed.weight  # one token like the model's: some schemes' updates use their weights
    token = torch.zeros(1, 1, model.cfg.d_model, dtype=weight.dtype, device=weight.device)
    with use_impl("reference"):  # bookkeeping only: dummy tensors, no depth reads
        state = scheme.init_state(token)
        carries_blocks = isinstance(state, DepthState)
        counts = [len(_flatten(state)) - 1]  # completed blocks after each sublayer boundary
        for layer in range(L):
            state = scheme.update(state, layer, token)
            counts.append(len(_flatten(state)) - 1)
    blocks_in = tuple(0 if c == 0 else counts[bounds[c]] for c in range(C))
    blocks_out = tuple(counts[bounds[c + 1]] for c in range(C))
    return PipelineLayout(pp, vpp, bounds, blocks_in, blocks_out, carries_blocks)


class SiteRows(nn.Module):
    """The rows of a per-read-site parameter ``[L+1, ...]`` for the read sites one chunk owns.

    Indexing by a global site id returns that site's row, so the residual scheme's own
    ``self.query[site]`` keeps working; an unowned site is an error, never a silent stale row.
    """

    def __init__(self, full: Tensor, sites: Sequence[int]) -> None:
        super().__init__()
        self.sites = tuple(sites)
        self._row = {site: i for i, site in enumerate(self.sites)}
        self.rows = nn.Parameter(full.detach()[list(self.sites)].clone())

    def __getitem__(self, site: int) -> Tensor:
        if site not in self._row:
            raise IndexError(
                f"read site {site} belongs to another pipeline chunk (this one owns {self.sites})"
            )
        return self.rows[self._row[site]]


def _slice_residual(scheme: nn.Module, sites: Sequence[int], n_sites: int) -> nn.Module:
    """A copy of ``scheme`` holding only the per-read-site parameter rows of ``sites``."""
    scheme = copy.deepcopy(scheme)
    if any(True for _ in scheme.children()):
        raise ValueError(
            f"cannot split residual scheme {type(scheme).__name__} with submodules over a pipeline"
        )
    for name, p in list(scheme.named_parameters(recurse=False)):
        if p.dim() == 0 or p.shape[0] != n_sites:
            raise ValueError(
                f"residual parameter {name!r} {tuple(p.shape)} is not per read site ([L+1, ...]); "
                f"{type(scheme).__name__} cannot be split over a pipeline"
            )
        delattr(scheme, name)
        setattr(scheme, name, SiteRows(p, sites))
    return scheme


class PipelineChunk(nn.Module):
    """Chunk ``index`` of a pipelined :class:`Transformer`: the modules it owns, copied out of the model.

    ``forward`` takes token ids ``[B, T]`` on chunk 0 and the residual state elsewhere; it returns
    the residual state, or logits ``[B, T, vocab]`` on the last chunk.
    """

    def __init__(self, model: Transformer, layout: PipelineLayout, index: int) -> None:
        super().__init__()
        self.cfg = model.cfg
        self.index = index
        self.start, self.stop = layout.bounds[index], layout.bounds[index + 1]
        self.is_first, self.is_last = index == 0, index == layout.n_chunks - 1
        L = model.cfg.n_sublayers
        self.sites = [*range(self.start, self.stop), *([L] if self.is_last else [])]
        self.embed = copy.deepcopy(model.embed) if self.is_first else None
        self.sublayers = nn.ModuleList(
            copy.deepcopy(model.sublayers[i]) for i in range(self.start, self.stop)
        )
        self.residual = _slice_residual(model.residual, self.sites, L + 1)
        self.norm = copy.deepcopy(model.norm) if self.is_last else None
        self.lm_head = copy.deepcopy(model.lm_head) if self.is_last else None
        self.register_buffer("rope_cos", model.rope_cos.clone(), persistent=False)
        self.register_buffer("rope_sin", model.rope_sin.clone(), persistent=False)

    def forward(self, inp: Any) -> Any:
        impl = self.read_impl()
        with use_impl(impl):
            if self.is_first:
                Transformer.check_tokens(self, inp)  # only reads self.cfg
                state = self.residual.init_state(self.embed(inp))
            else:
                state = self._arrived(inp, impl)
            T = _flatten(state)[-1].shape[1]
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]
            for i, sublayer in enumerate(self.sublayers):
                layer = self.start + i
                state = self.residual.update(
                    state, layer, sublayer(self.residual.layer_input(state, layer), cos, sin)
                )
            if self.is_last:
                return self.lm_head(self.norm(self.residual.final(state)))
            return state

    def read_impl(self) -> str:
        """This chunk's depth-read implementation: the model's, except ``two_phase`` reads as ``fused``.

        ``two_phase`` carries the open group's phase-1 results in the state; a chunk that starts
        mid-group has neither those nor the query rows of the group's earlier sites to recompute
        them. ``fused`` needs only each source's ``rstd``, which is token-local and cheap, so a
        chunk recomputes it for the sources it receives (:meth:`_arrived`).
        """
        fast = getattr(self.residual, "fast_reads_supported", None)
        if fast is None:  # no depth reads (prenorm and friends): nothing to choose
            return "reference"
        impl = select_impl(self.residual.cfg.impl, fast())
        if impl == "two_phase":
            if self.residual.cfg.impl == "two_phase":  # asked for by name; auto picks it without grads
                warnings.warn("pipeline chunks read depth with 'fused' instead of 'two_phase'", stacklevel=2)
            return "fused"
        return impl

    def _arrived(self, state: Any, impl: str) -> Any:
        """A state from the previous chunk (received, or passed in-process) set up for ``impl``.

        Only blocks and the partial cross a boundary; the fused path's per-source ``rstd`` is
        recomputed from them here (the scheme's ``resume``). Its gradient then reaches the sources
        through the received leaves, so the sender gets the same total gradient, summed in a
        different order.
        """
        if not isinstance(state, DepthState) or state.impl == impl:
            return state
        return self.residual.resume(replace(state, impl=impl), self.start)

    def global_names(self) -> dict[str, tuple[str, tuple[int, ...] | None]]:
        """Local parameter name -> (name in the full model, owned rows or ``None`` for the whole tensor)."""
        out: dict[str, tuple[str, tuple[int, ...] | None]] = {}
        for name, _ in self.named_parameters():
            if name.startswith("sublayers."):
                _, i, rest = name.split(".", 2)
                out[name] = (f"sublayers.{self.start + int(i)}.{rest}", None)
            elif name.startswith("residual.") and name.endswith(".rows"):
                out[name] = (name.removesuffix(".rows"), tuple(self.sites))
            else:
                out[name] = (name, None)
        return out


def split_model(
    model: Transformer, pp: int, vpp: int = 1, rank: int | None = None, bounds: Sequence[int] | None = None
) -> tuple[PipelineLayout, list[PipelineChunk]]:
    """Cut ``model`` into ``pp * vpp`` chunks; with ``rank``, build only that rank's ``vpp`` chunks."""
    layout = make_layout(model, pp, vpp, bounds)
    indices = layout.chunks_of(rank) if rank is not None else range(layout.n_chunks)
    return layout, [PipelineChunk(model, layout, c) for c in indices]


Op = tuple[str, int, int]  # ("F" | "B", chunk, microbatch)
Message = tuple[str, int, int]  # ("fwd" | "bwd", transition j = the link into chunk j, microbatch)


def schedule_units(rank: int, pp: int, vpp: int, n_microbatches: int) -> list[list[Op]]:
    """:func:`schedule`'s ops in communication units: a unit's sends and the next unit's receives
    are posted together (one ``batch_isend_irecv``).

    Each op is its own unit, except in interleaved 1F1B's steady state, where a forward and the
    backward after it form one. There neighbouring ranks each have a forward and a backward
    message for the other; posted one at a time, both ranks would send before either receives,
    which NCCL (it matches a pair's messages in order and cannot finish a large send before the
    receive is posted) can deadlock on. Posted as one group per 1F1B pair, they never wait on each
    other (``tests/distributed/test_pipeline_split.py`` replays every rank's groups to show it).
    """
    M = n_microbatches
    if vpp == 1:
        return [[("F", rank, m)] for m in range(M)] + [[("B", rank, m)] for m in range(M)]
    if M % pp:
        raise ValueError(
            f"interleaved 1F1B needs the number of micro-batches ({M}) to be a multiple of "
            f"--parallel.pp={pp}; change --parallel.microbatches"
        )
    total = M * vpp

    def op(kind: str, k: int) -> Op:
        group, within = divmod(k, pp * vpp)
        v = within // pp
        if kind == "B":
            v = vpp - 1 - v
        return (kind, v * pp + rank, group * pp + within % pp)

    warmup = total if pp == M else min(total, 2 * (pp - rank - 1) + (vpp - 1) * pp)
    units = [[op("F", k)] for k in range(warmup)]
    units += [[op("F", warmup + i), op("B", i)] for i in range(total - warmup)]
    return units + [[op("B", k)] for k in range(total - warmup, total)]


def schedule(rank: int, pp: int, vpp: int, n_microbatches: int) -> list[Op]:
    """The ordered ``("F" | "B", chunk, microbatch)`` ops of ``rank``.

    GPipe for ``vpp == 1`` (all forwards, then all backwards); otherwise interleaved 1F1B
    (Megatron-LM's order: micro-batches in groups of ``pp``, warm-up of
    ``2 (pp - rank - 1) + (vpp - 1) pp`` forwards, then one forward / one backward).
    """
    return [op for unit in schedule_units(rank, pp, vpp, n_microbatches) for op in unit]


def op_messages(op: Op, n_chunks: int) -> tuple[list[tuple[int, Message]], list[tuple[int, Message]]]:
    """What ``op`` receives before it runs and sends after: ``(peer chunk, message)`` lists.

    A forward of chunk ``c`` receives over transition ``c`` from chunk ``c - 1`` and sends over
    ``c + 1``; a backward receives the gradient over ``c + 1`` and sends it back over ``c``.
    """
    kind, c, m = op
    if kind == "F":
        recvs = [(c - 1, ("fwd", c, m))] if c > 0 else []
        sends = [(c + 1, ("fwd", c + 1, m))] if c < n_chunks - 1 else []
    else:
        recvs = [(c + 1, ("bwd", c + 1, m))] if c < n_chunks - 1 else []
        sends = [(c - 1, ("bwd", c, m))] if c > 0 else []
    return recvs, sends


def forward_schedule(rank: int, pp: int, vpp: int, n_microbatches: int) -> list[list[Op]]:
    """The ``("F", chunk, microbatch)`` ops of ``rank`` for a forward-only pass (evaluation), one per unit.

    Micro-batch by micro-batch, each through this rank's chunks in order. Every rank follows the
    same ``(microbatch, chunk)`` order and ``("F", c, m)`` waits only on ``("F", c - 1, m)``, which
    comes earlier in it, so it cannot deadlock; any number of micro-batches works.
    """
    return [[("F", c, m)] for m in range(n_microbatches) for c in range(rank, pp * vpp, pp)]


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
    """One step's micro-batches and the state its ops hand each other on this rank."""

    tokens: tuple[Tensor, ...]  # M micro-batches [B/M, T]
    targets: tuple[Tensor, ...]
    like: Any  # a residual state of the scheme's type, for unflattening received tensors
    loss_sum: Tensor
    keep: bool  # grad mode: keep inputs and outputs for the backward
    cache: dict[int, list[Tensor]] = field(default_factory=dict)  # mb -> blocks leaving the latest chunk
    inputs: dict[tuple[int, int], list[Tensor]] = field(default_factory=dict)  # (chunk, mb) -> input leaves
    outputs: dict[tuple[int, int], Any] = field(default_factory=dict)  # (chunk, mb) -> outputs, or the loss
    local_grads: dict[tuple[int, int], list[Tensor]] = field(default_factory=dict)  # grads of cached blocks


class PipelineRunner:
    """Runs one rank's chunks through a training step with point-to-point ``torch.distributed`` ops.

    Each communication unit's messages go out as one ``batch_isend_irecv`` (:func:`schedule_units`),
    so the interleaved schedule cannot deadlock on NCCL either. Construction is a collective (a
    barrier: NCCL requires the group's first collective to involve every rank, and the first batch
    of point-to-point messages does not); with NCCL, call ``torch.cuda.set_device`` first.

    Args:
        chunks: this rank's chunks, in virtual-stage order (``split_model(..., rank=rank)``).
        layout: the pipeline layout.
        cache: ``"off"``, ``"received"`` or ``"seen"`` (module docstring).
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

    def _tag(self, message: Message) -> int:
        direction, transition, microbatch = message
        return ((direction == "bwd") * self.layout.n_chunks + transition) * self._n_mb + microbatch

    def _send(self, tensors: Sequence[Tensor], message: Message, dst_chunk: int) -> None:
        """Queue ``tensors`` as one message; it goes out with the unit's :meth:`_exchange`."""
        buf = pack(tensors)
        check_message(buf, (self._wire_tensors(message[1]), *self._act_shape), self._dtype, message)
        blocks = len(tensors) - 1 if self.layout.carries_blocks else 0
        direction, transition, microbatch = message
        self.stats.records.append(
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
        self._outgoing.append((dst_chunk, message, buf))

    def _wire_tensors(self, transition: int) -> int:
        """``[B, T, d]`` tensors per message over ``transition``: the blocks not cached, the partial."""
        if not self.layout.carries_blocks:
            return 1
        return self.layout.blocks_out[transition - 1] + 1 - self.layout.known(transition, self.cache)

    def _exchange(self, unit: list[Op], next_unit: list[Op]) -> None:
        """Post ``unit``'s queued sends and ``next_unit``'s receives as one group, and wait for it.

        The sends must be the ones :func:`op_messages` plans for ``unit``, in order: the schedule's
        freedom from deadlock on NCCL, which matches a pair's messages in order, rests on it.
        """
        planned = [(chunk, msg) for op in unit for chunk, msg in op_messages(op, self.layout.n_chunks)[1]]
        sent = [(chunk, msg) for chunk, msg, _ in self._outgoing]
        if sent != planned:
            raise RuntimeError(f"pipeline sent {sent} where the plan has {planned}")
        p2p = [
            dist.P2POp(dist.isend, buf, self._peer(chunk), self.group, self._tag(msg))
            for chunk, msg, buf in self._outgoing
        ]
        for op in next_unit:
            for chunk, msg in op_messages(op, self.layout.n_chunks)[0]:
                # NaN-filled: a short receive shows
                buf = torch.full(
                    (self._wire_tensors(msg[1]), *self._act_shape),
                    float("nan"),
                    dtype=self._dtype,
                    device=self._device,
                )  # [n, B, T, d]
                self._received[msg] = buf
                p2p.append(dist.P2POp(dist.irecv, buf, self._peer(chunk), self.group, self._tag(msg)))
        if p2p:
            for work in dist.batch_isend_irecv(p2p):
                work.wait()
        self._outgoing = []

    def _take(self, message: Message) -> list[Tensor]:
        """The tensors of a message received by the last :meth:`_exchange`."""
        return list(self._received.pop(message).unbind(0))

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
        self._n_mb, self._dtype, self._device = M, param.dtype, param.device
        self._act_shape = (tokens.shape[0] // M, tokens.shape[1], some_chunk.cfg.d_model)
        self.stats, self._outgoing, self._received = CommStats(), [], {}
        step = _Step(
            tokens=tokens.chunk(M),
            targets=targets.chunk(M),
            like=self._state_template(),
            loss_sum=torch.zeros((), dtype=torch.float64, device=self._device),  # NCCL: on the GPU
            keep=torch.is_grad_enabled(),
        )
        self._exchange([], units[0])
        for u, unit in enumerate(units):
            for kind, c, m in unit:
                (self._forward if kind == "F" else self._backward)(step, c, m)
            self._exchange(unit, units[u + 1] if u + 1 < len(units) else [])

        if step.inputs or step.outputs or step.local_grads or step.cache or self._received:
            raise RuntimeError("pipeline step left unconsumed state; the schedule is inconsistent")
        dist.broadcast(step.loss_sum, self._peer(self.layout.n_chunks - 1), self.group)
        return float(step.loss_sum), self.stats

    def _forward(self, step: _Step, c: int, m: int) -> None:
        """Chunk ``c`` on micro-batch ``m``: input from the wire and the cache, output queued to send."""
        layout, C = self.layout, self.layout.n_chunks
        if c == 0:
            leaves, inp = [], step.tokens[m]
        else:
            k = layout.known(c, self.cache)
            wire = self._take(("fwd", c, m))
            leaves = [t.detach().requires_grad_() for t in step.cache.get(m, [])[:k] + wire]
            inp = _unflatten(step.like, leaves)
        with self.autocast():
            out = self.chunks[c](inp)
            if c == C - 1:
                out = lm_loss(out, step.targets[m]) / len(step.tokens)
        if c == C - 1:
            step.loss_sum += out.detach().double()
            step.cache.pop(m, None)
        else:
            out = _flatten(out)
            if c + layout.pp < C:  # this rank runs the micro-batch again: keep its blocks
                step.cache[m] = out[:-1]
            else:
                step.cache.pop(m, None)
            self._send(out[layout.known(c + 1, self.cache) :], ("fwd", c + 1, m), c + 1)
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
            grads: list[Tensor | None] = [None] * k_next + self._take(("bwd", c + 1, m))
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
            self._send(in_grads[k:], ("bwd", c, m), c - 1)

    def _state_template(self) -> Any:
        any_chunk = next(iter(self.chunks.values()))
        with use_impl("reference"):  # only the state's type is needed
            return any_chunk.residual.init_state(torch.zeros(1))
