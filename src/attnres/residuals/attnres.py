"""Full and Block Attention Residuals: softmax attention over depth (SPEC §2–3).

One schedule covers both, parameterised by the block size ``S`` in sublayers (``S = 1`` is Full)::

    blocks, partial = [], embedding
    for l in range(L):
        h = read_l(blocks + [partial])          # identity while only the embedding exists
        if l % S == 0:                          # boundary: seal the running sum
            blocks.append(partial); partial = None
        partial = f_l(h) if partial is None else partial + f_l(h)
    h_final = read_L(blocks + [partial])

Here the sealing happens in :meth:`update`, which is equivalent: the read of sublayer ``l`` happens
before it either way.

Reads run through one of the implementations in :mod:`attnres.ops.dispatch`, chosen once per
forward in :meth:`BlockAttnRes.init_state` and carried in the state. The fast paths keep each
source's RMS statistic in the state (computed once, when the source is created), and ``two_phase``
groups read sites ``gS … gS+S-1`` (the last group also holds the final read ``L``): they all see
the completed blocks ``b_0 … b_g``, so phase 1 runs for the whole group as soon as ``b_g`` is
complete, in the :meth:`~BlockAttnRes.update` before site ``gS``. Every method returns a new
state and never mutates one.

Dtypes: every source is in the stream dtype, the embedding's (:func:`attnres.residuals.base.to_stream`
brings each sublayer output to it in :meth:`~BlockAttnRes.update`, for every implementation), so a
read's sources share one dtype under autocast too; the reads compute their statistics in fp32 and
return the stream dtype (SPEC §2, :mod:`attnres.ops.precision`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnres.ops import depth_read, depth_weights
from attnres.ops.dispatch import select_impl
from attnres.ops.fused import fold_query, fused_depth_read, source_rstd
from attnres.ops.general import general_depth_read
from attnres.ops.precision import no_autocast, stats_dtype
from attnres.ops.stacked import (
    SourceStack,
    stacked_accumulate,
    stacked_first_read,
    stacked_merge,
    stacked_phase1,
)
from attnres.ops.two_phase import phase1, phase2_merge
from attnres.residuals.base import (
    ResidualConfig,
    ResidualScheme,
    check_at_least,
    check_choice,
    check_eps,
    to_stream,
)
from attnres.residuals.registry import register


@dataclass
class DepthReadOptions(ResidualConfig):
    """Options of Full AttnRes, and of every read by depth attention (``block``, ``swa`` add theirs).

    The defaults are the paper's method; the others are the ablations of paper Table 4.

    Attributes:
        eps: epsilon of the key RMSNorm in depth reads.
        query: ``"learned"`` a pseudo-query ``w_l`` per read site (paper); ``"input"`` a ``d×d``
            projection of the newest source (input-dependent query); ``"none"`` learned scalar
            logits per (read site, source), no query or key (input-independent mixing).
        normalizer: ``"softmax"`` over sources (paper) or ``"sigmoid"`` per source.
        key_norm: RMS-normalise the keys (paper); ``False`` scores the raw sources.
        heads: depth-attention heads, ``H`` groups of channels with their own weights. ``None``
            is 1.
        query_init: ``"zero"`` or ``None`` (the same): pseudo-queries start at zero (SPEC §2).
    """

    variant: str = "full"
    eps: float = 1e-6
    query: str = "learned"
    normalizer: str = "softmax"
    key_norm: bool = True
    heads: int | None = None
    query_init: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_eps(self)
        check_choice(self, "query", ("learned", "input", "none"))
        check_choice(self, "normalizer", ("softmax", "sigmoid"))
        check_choice(self, "query_init", ("zero", "normal"))
        check_at_least(self, "heads")


def check_block_size(cfg: ResidualConfig) -> None:
    """Raise unless ``cfg.block_size`` is ``None`` or at least 1 sublayer."""
    if cfg.block_size is not None and cfg.block_size < 1:
        raise ValueError(
            f"residual.block_size must be >= 1 sublayer (got {cfg.block_size}); "
            "use 1 for Full AttnRes, or None for the default of about 8 blocks"
        )


@dataclass
class BlockOptions(DepthReadOptions):
    """Options of Block AttnRes: those of :class:`DepthReadOptions`, and the block size.

    Attributes:
        block_size: AttnRes block size ``S`` in *sublayers* (attention and MLP count one each).
            ``None`` picks the paper's default of about 8 blocks, ``S = ceil(L / 8)``.
    """

    variant: str = "block"
    block_size: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_block_size(self)


@dataclass(frozen=True)
class DepthState:
    """Sources carried across depth.

    Attributes:
        blocks: completed block representations ``b_0 … b_g``; ``b_0`` is the embedding.
        partial: the live intra-block running sum (the embedding before sublayer 0).
        impl: the depth-read implementation of this forward (``reference``, ``fused``, ``two_phase``).
        rstd: fast paths only: ``source_rstd`` of each of :attr:`sources`, ``[B, T]`` each.
        group_start: ``two_phase`` only: the first read site of the current group.
        group: ``two_phase`` only: that group's phase-1 ``(outs, lse)``, one entry per site.
    """

    blocks: tuple[Tensor, ...]
    partial: Tensor
    impl: str = "reference"
    rstd: tuple[Tensor, ...] = ()
    group_start: int = 0
    group: tuple[tuple[Tensor, ...], Tensor] | None = None

    @property
    def sources(self) -> list[Tensor]:
        """What a read sees now: the completed blocks, then the partial sum."""
        return [*self.blocks, self.partial]


@dataclass(frozen=True)
class StackedDepthState:
    """Sources carried across depth by the inference (no-grad) two-phase path.

    Attributes:
        stack: the completed blocks ``b_0 … b_g`` and their statistics, stacked once each. Every
            state of one forward shares it: a block is pushed when its group opens and never
            changes, so a state only ever reads rows that were complete when it was made.
        n_blocks: blocks on the stack as this state sees them. Because the stack is shared, a
            state can be advanced past a block boundary once: a second ``update`` from the same
            state (a replay) would find a longer stack, and is refused rather than read it.
        partial: the live intra-block running sum (stream dtype).
        partial_rstd: its ``rsqrt(mean(p²) + eps)``.
        queries: every read site's folded query ``w ⊙ γ`` ``[L+1, d]``, computed once per forward.
        group_start: the first read site of the open group.
        group: that group's phase-1 ``(outs [..., S', d], lse [..., S'] or None)``.
    """

    stack: SourceStack
    partial: Tensor
    partial_rstd: Tensor
    queries: Tensor
    group_start: int = 0
    group: tuple[Tensor, Tensor | None] | None = None
    n_blocks: int = 0


def default_block_size(n_sublayers: int) -> int:
    """The paper's default of about 8 blocks: ``S = ceil(L / 8)``."""
    return max(1, math.ceil(n_sublayers / 8))


@register("block")
class BlockAttnRes(ResidualScheme):
    """Block AttnRes: sublayer outputs are summed within blocks of ``S`` sublayers.

    Parameters (one row per read site: ``L`` sublayer inputs, then the final read):
        ``query [L+1, d]``: pseudo-queries ``w_l``, **zero at init**, so the first forward is a
        uniform average of the sources (the paper calls this essential for stable training).
        ``key_gain [L+1, d]``: key RMSNorm gains ``γ_l``, one at init.

    The ablation switches of paper Table 4 are options in :class:`DepthReadOptions` (the defaults
    are the paper's read; see :mod:`attnres.ops.general` for the math):

    - ``query="input"``: input-dependent query ``q_l = W_l · rmsnorm(x)``, with ``query_proj
      [L+1, d, d]`` replacing ``query``. ``x`` is the newest source of the read: the live partial
      sum for Block, the previous sublayer's output for Full, the embedding at the first read.
      The read's own output cannot be its input, and the paper does not say which earlier state
      it projects, so this is **our choice**. The RMSNorm (no gain) keeps the score scale
      independent of the stream's growth, also our choice. ``W_l`` is **zero at init** (our
      choice) so the first forward stays a uniform average, as with pseudo-queries.
    - ``query="none"``: input-independent mixing, learned logits ``mix_logits [L+1, N_max]``
      (zero at init: uniform) softmaxed over the read's ``N`` sources; no query, no key. Row
      ``l`` uses its first ``N_l`` entries, so entries beyond a read's source count stay unused.
    - ``normalizer="sigmoid"``: ``α_i = σ(s_i)`` per source instead of a softmax over sources.
    - ``key_norm=False``: scores on the raw sources; no ``key_gain``.
    - ``heads=H``: ``H`` channel groups, each with its own weights from its slice of the query
      and key; ``H = 1`` is the single-head read.
    """

    options = BlockOptions

    def __init__(self, cfg: ResidualConfig, d_model: int, n_sublayers: int) -> None:
        super().__init__(cfg, d_model, n_sublayers)
        self.block_size = self._block_size(cfg, n_sublayers)
        if cfg.query_init not in (None, "zero"):
            raise ValueError(
                f"residual.query_init={cfg.query_init!r}: AttnRes pseudo-queries must start at zero "
                "(SPEC §2: a uniform first read); use query_init=zero or leave it unset"
            )
        self.heads = cfg.heads if cfg.heads is not None else 1
        if d_model % self.heads:
            raise ValueError(f"residual.heads={self.heads} must divide d_model={d_model}")
        if cfg.query == "none" and self.heads > 1:  # one scalar logit per source: nothing per head
            raise ValueError(
                f"residual.heads={self.heads} needs a query; input-independent mixing "
                "(residual.query=none) has one weight per source, so leave heads unset"
            )
        sites = n_sublayers + 1
        if cfg.query == "learned":
            self.query = nn.Parameter(torch.zeros(sites, d_model))
        elif cfg.query == "input":
            self.query_proj = nn.Parameter(torch.zeros(sites, d_model, d_model))
        else:
            self.mix_logits = nn.Parameter(torch.zeros(sites, self.max_sources()))
        if cfg.key_norm and cfg.query != "none":
            self.key_gain = nn.Parameter(torch.ones(sites, d_model))
        self._paper_read = (
            cfg.query == "learned" and cfg.key_norm and cfg.normalizer == "softmax" and self.heads == 1
        )

    @staticmethod
    def _block_size(cfg: ResidualConfig, n_sublayers: int) -> int:
        return cfg.block_size if cfg.block_size is not None else default_block_size(n_sublayers)

    def max_sources(self) -> int:
        """The most sources any read sees: the final read's ``ceil(L/S)`` blocks plus the partial."""
        return math.ceil(self.n_sublayers / self.block_size) + 1

    def reset_parameters(self) -> None:
        for name in ("query", "query_proj", "mix_logits"):
            if hasattr(self, name):
                nn.init.zeros_(getattr(self, name))
        if hasattr(self, "key_gain"):
            nn.init.ones_(self.key_gain)

    @no_autocast  # the input-dependent query is a matmul: fp32, not autocast's bf16/fp16
    def read(self, sources: list[Tensor], site: int) -> Tensor:
        """Depth read at ``site`` (``0 … L-1`` sublayer inputs, ``L`` the final read)."""
        if self._paper_read:
            out = depth_read(sources, self.query[site], self.key_gain[site], self.cfg.eps)
            if self.recorder is not None:
                weights = depth_weights(sources, self.query[site], self.key_gain[site], self.cfg.eps)
                self.recorder(site, sources, weights.unsqueeze(-1))  # [N, B, T, H=1]
            return out
        gain = self.key_gain[site] if hasattr(self, "key_gain") else None
        if self.cfg.query == "none":
            query, logits = None, self.mix_logits[site, : len(sources)]
        elif self.cfg.query == "input":
            sd = stats_dtype(sources[-1].dtype)
            x = F.rms_norm(sources[-1].to(sd), (self.d_model,), eps=self.cfg.eps)
            query, logits = x @ self.query_proj[site].to(sd).T, None  # [..., d]
        else:
            query, logits = self.query[site], None
        out, weights = general_depth_read(
            sources,
            query,
            gain,
            self.cfg.eps,
            heads=self.heads,
            normalizer=self.cfg.normalizer,
            logits=logits,
        )
        if self.recorder is not None:
            self.recorder(site, sources, weights)
        return out

    def fast_reads_supported(self) -> bool:
        """Whether the fused and two-phase paths implement this configuration.

        They implement the paper's default read (softmax over sources, RMS-normalised keys with a
        gain, one static query per site). A configuration they do not implement must return
        ``False`` here; ``select_impl`` then falls back to the reference read. Recording the
        weights for diagnostics also needs the reference read, which computes them.
        """
        return self._paper_read and self.recorder is None

    def init_state(self, embedding: Tensor) -> DepthState | StackedDepthState:
        impl = select_impl(self.cfg.impl, self.fast_reads_supported())
        if impl == "two_phase" and not torch.is_grad_enabled():
            return self._init_stacked(embedding)
        state = DepthState(blocks=(), partial=embedding, impl=impl)
        if impl == "reference":
            return state
        state = replace(state, rstd=(source_rstd(embedding, self.cfg.eps),))
        return self._open_group(state, 0) if impl == "two_phase" else state

    def layer_input(self, state: DepthState | StackedDepthState, layer: int) -> Tensor:
        return self._read(state, layer)

    def update(
        self, state: DepthState | StackedDepthState, layer: int, out: Tensor
    ) -> DepthState | StackedDepthState:
        sealed = layer % self.block_size == 0
        if isinstance(state, StackedDepthState):
            out = to_stream(out, state.partial)
            partial, rstd = stacked_accumulate(None if sealed else state.partial, out, self.cfg.eps)
            if (layer + 1) % self.block_size == 0:
                return self._open_stacked_group(state, partial, rstd, layer + 1)
            # the constructor, not dataclasses.replace: ~2 µs less per sublayer, a decode step's budget
            return StackedDepthState(
                state.stack, partial, rstd, state.queries, state.group_start, state.group, state.n_blocks
            )
        partial = to_stream(out if sealed else state.partial + out, state.partial)  # the stream dtype
        blocks = (*state.blocks, state.partial) if sealed else state.blocks
        if state.impl == "reference":
            return DepthState(blocks=blocks, partial=partial)
        kept = state.rstd if sealed else state.rstd[:-1]  # a sealed partial keeps its statistic
        new = replace(state, blocks=blocks, partial=partial, rstd=(*kept, source_rstd(partial, self.cfg.eps)))
        if state.impl == "two_phase" and (layer + 1) % self.block_size == 0:
            return self._open_group(new, layer + 1)
        return new

    def final(self, state: DepthState | StackedDepthState) -> Tensor:
        return self._read(state, self.n_sublayers)

    def fused_normed_input(
        self, state: DepthState | StackedDepthState, layer: int, norm: nn.Module
    ) -> Tensor | None:
        """Without gradients (the stacked state), the read and the RMSNorm after it in one pass.

        Not for a norm whose gain is a sharded ``DTensor`` (FSDP2 gathers it only inside the
        sublayer's own forward): there the sublayer applies its norm itself.
        """
        if not (isinstance(state, StackedDepthState) and isinstance(norm, nn.RMSNorm)):
            return None
        if norm.weight is not None and type(norm.weight.data) is not torch.Tensor:  # DTensor, subclasses
            return None
        return self._read_stacked(state, layer, norm)

    def checkpoint_group(self) -> int:
        """One block of ``S`` sublayers (Full: one sublayer), as in the paper's training schedule."""
        return self.block_size

    def carry(self, state: DepthState | StackedDepthState) -> DepthState | StackedDepthState:
        """The blocks, the partial sum and their ``[B, T]`` statistics.

        ``two_phase``'s phase-1 results for the next group (``S`` tensors ``[B, T, d]``) are
        dropped: :meth:`resume` recomputes them inside the group that reads them.
        """
        return replace(state, group=None) if isinstance(state, DepthState) and state.group else state

    def resume(self, state: DepthState | StackedDepthState, site: int) -> DepthState | StackedDepthState:
        """Rebuild the fast paths' statistics where they are missing (a state that arrived from
        another pipeline stage carries only blocks and the partial), and ``two_phase``'s phase 1
        for the group starting at ``site``.

        At the final read ``site = L`` the "group" is that one read over every source (the live
        partial included), which is the read itself; any other ``site`` must be a group start.
        """
        if not isinstance(state, DepthState) or state.impl == "reference":
            return state
        if len(state.rstd) != len(state.sources):
            state = replace(state, rstd=tuple(source_rstd(t, self.cfg.eps) for t in state.sources))
        if state.impl == "two_phase" and state.group is None:
            state = self._open_group(state, site)
        return state

    def _read(self, state: DepthState | StackedDepthState, site: int) -> Tensor:
        if isinstance(state, StackedDepthState):
            return self._read_stacked(state, site)
        if state.impl == "reference":
            return self.read(state.sources, site)
        if state.impl == "fused":
            return fused_depth_read(
                state.sources, self.query[site], self.key_gain[site], self.cfg.eps, rstd=state.rstd
            )
        outs, lse = state.group
        i = self._group_index(state, site, len(outs))
        if i == 0:  # the group's first read sees exactly the completed blocks
            return outs[0].to(state.partial.dtype)
        return phase2_merge(
            outs[i], lse[..., i], state.partial, state.rstd[-1], self.query[site], self.key_gain[site]
        )

    @staticmethod
    def _group_index(state: DepthState | StackedDepthState, site: int, group_size: int) -> int:
        i = site - state.group_start
        if not 0 <= i < group_size:
            raise RuntimeError(
                f"read site {site} is outside the two-phase group starting at {state.group_start}; "
                "the state was not produced by update() for the previous sublayer"
            )
        return i

    def _init_stacked(self, embedding: Tensor) -> StackedDepthState:
        partial, rstd = stacked_accumulate(None, embedding, self.cfg.eps)
        state = StackedDepthState(
            stack=SourceStack(embedding, self.max_sources()),
            partial=partial,
            partial_rstd=rstd,
            queries=fold_query(self.query, self.key_gain, embedding.dtype),
        )
        return self._open_stacked_group(state, partial, rstd, 0)

    def _open_stacked_group(
        self, state: StackedDepthState, partial: Tensor, rstd: Tensor, start: int
    ) -> StackedDepthState:
        """The state after ``state`` whose partial sum ``partial`` (statistic ``rstd``) is now complete:
        pushed as block ``b_g``, then phase 1 for sites ``start …``."""
        if state.stack.size != state.n_blocks:
            raise RuntimeError(
                "this inference state was already advanced past this block boundary: without "
                "gradients the blocks live on one shared stack, so each state can be updated once. "
                "Replay a forward with gradients enabled, or with impl='fused'"
            )
        state.stack.push(partial, rstd)
        end = min(start + self.block_size, self.n_sublayers + 1)
        group = stacked_phase1(state.stack, state.queries[start:end], need_lse=end - start > 1)
        return StackedDepthState(state.stack, partial, rstd, state.queries, start, group, state.n_blocks + 1)

    def _read_stacked(self, state: StackedDepthState, site: int, norm: nn.RMSNorm | None = None) -> Tensor:
        """The read at ``site``, or ``norm`` of it (fused with the merge) when ``norm`` is given."""
        outs, lse = state.group  # [M, S', d], [M, S']
        i = self._group_index(state, site, outs.shape[1])
        weight, eps = (None, None) if norm is None else (norm.weight, norm.eps)
        if norm is not None and weight is None:  # a norm without a gain: 1
            weight = torch.ones(self.d_model, dtype=state.partial.dtype, device=state.partial.device)
        if i == 0:  # the group's first read sees exactly the completed blocks
            return stacked_first_read(outs[:, 0], state.partial, weight, eps)
        return stacked_merge(
            outs[:, i], lse[:, i], state.partial, state.partial_rstd, state.queries[site], weight, eps
        )

    def _open_group(self, state: DepthState, start: int) -> DepthState:
        """Phase 1 for sites ``start …`` of one group, against ``sources`` (all complete blocks here)."""
        end = min(start + self.block_size, self.n_sublayers + 1)
        group = phase1(state.sources, state.rstd, self.query[start:end], self.key_gain[start:end])
        return replace(state, group_start=start, group=group)

    def extra_repr(self) -> str:
        return f"block_size={self.block_size}, read_sites={self.n_sublayers + 1}, d={self.d_model}"


@register("full")
class FullAttnRes(BlockAttnRes):
    """Full AttnRes: every sublayer output is its own source (``S = 1``; paper Eq. 2–4)."""

    options = DepthReadOptions

    @staticmethod
    def _block_size(cfg: ResidualConfig, n_sublayers: int) -> int:
        return 1
