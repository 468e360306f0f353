"""``hierarchical``: the popular *explainer* version of "block attention residuals".

.. warning::
   **This is NOT the paper's method.** It exists so that people who learned AttnRes from a widely
   read explainer can compare that design with the real one (``block`` / ``full``). The paper sums
   sublayer outputs within a block and reads the blocks with one ``d``-vector pseudo-query per read
   site, zero-initialised, against RMS-normalised keys. The explainer instead (SPEC §7):

   - keeps a block's sublayer outputs individually and mixes them with multi-head attention, with
     learned key projections ``W_K`` and learned queries (or ``W_Q`` of an input query), scaled
     dot products and a softmax; that mix is the block's summary;
   - combines the block summaries with a second attention of the same form;
   - initialises its queries from a normal distribution and has no key RMSNorm.

Our adaptation to per-read-site use (SPEC §7). Sources are grouped like Block AttnRes: the
embedding alone, then groups of ``S = residual.block_size`` sublayer outputs (the last group may be
partial). Every read site ``l`` (``L`` sublayer inputs plus the final read) owns two attentions,
*inner* (within a group) and *outer* (over the group summaries), each::

    k_i = W_K v_i, split into H heads of d_k = d/H      (no key norm)
    s_i = q · k_i / sqrt(d_k)                           (q: learned [d], or W_Q x)
    α   = softmax_i(s),  out[h] = Σ_i α_i,h v_i[h]      (values raw, per head)

The explainer summarises a block by the mean of its mix; with one query per head per read site
the mix is a single vector, so that mean is the mix itself. ``x`` for ``query="input"`` is the
newest source (the previous sublayer's output, or the embedding at the first read).

Cost: ``O(S + L/S)`` scores per read (``O(S² + L·L/S)`` over the model as summaries are recomputed
per read site), and ``d² + d`` (learned query) or ``2d²`` (input query) parameters per attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from attnres.ops.general import general_depth_logits, general_depth_mix, general_depth_weights
from attnres.ops.precision import no_autocast, stats_dtype
from attnres.residuals.attnres import check_block_size, default_block_size
from attnres.residuals.base import ResidualConfig, ResidualScheme, check_at_least, check_choice, to_stream
from attnres.residuals.registry import register

INNER, OUTER = 0, 1


@dataclass
class HierarchicalOptions(ResidualConfig):
    """Options of the explainer's two-level block attention.

    Attributes:
        block_size: sublayer outputs per group, ``S``. ``None`` picks about 8 groups,
            ``S = ceil(L / 8)``, as Block AttnRes does.
        query: ``"learned"`` a query per read site and attention; ``"input"`` a ``d×d``
            projection of the newest source (input-dependent query).
        heads: attention heads, ``H`` groups of channels. ``None`` is 4.
        query_init: ``"normal"`` (the explainer's; ``None`` is the same) or ``"zero"`` (every first
            read uniform, as the paper wants).
    """

    variant: str = "hierarchical"
    block_size: int | None = None
    query: str = "learned"
    heads: int | None = None
    query_init: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_block_size(self)
        check_choice(self, "query", ("learned", "input", "none"))
        check_choice(self, "query_init", ("zero", "normal"))
        check_at_least(self, "heads")


@dataclass(frozen=True)
class GroupState:
    """``groups``: completed groups of individual sources (``groups[0]`` is the embedding alone);
    ``current``: the outputs of the group being filled."""

    groups: tuple[tuple[Tensor, ...], ...]
    current: tuple[Tensor, ...]

    @property
    def all_groups(self) -> list[tuple[Tensor, ...]]:
        return [*self.groups, self.current] if self.current else list(self.groups)


@register("hierarchical")
class HierarchicalAttnRes(ResidualScheme):
    """The explainer's two-level block attention (NOT the paper's method; see the module docstring).

    Parameters, per read site and per attention (``[L+1, 2, ...]``, index 0 inner, 1 outer):
        ``key_proj [.., d, d]``: ``W_K``, normal with std ``d^-1/2``.
        ``query [.., d]`` (``query="learned"``): normal with std 1 by default, as the explainer
        initialises its queries; ``query_init="zero"`` makes every first read uniform, as the
        paper wants (**our choice** to offer it).
        ``query_proj [.., d, d]`` (``query="input"``): ``W_Q``, normal with std ``d^-1/2``, or
        zero with ``query_init="zero"``.
    The standard deviations are **our choice**: the explainer's exact scales are not recorded
    in our sources; these keep keys and queries at the scale of their inputs.
    Heads: ``residual.heads`` (default 4).
    """

    options = HierarchicalOptions

    def __init__(self, cfg: ResidualConfig, d_model: int, n_sublayers: int) -> None:
        super().__init__(cfg, d_model, n_sublayers)
        if cfg.query not in ("learned", "input"):
            raise ValueError(f"hierarchical supports residual.query=learned or input, got {cfg.query!r}")
        self.block_size = cfg.block_size if cfg.block_size is not None else default_block_size(n_sublayers)
        self.heads = cfg.heads if cfg.heads is not None else 4
        if d_model % self.heads:
            raise ValueError(
                f"hierarchical: residual.heads={self.heads} must divide d_model={d_model}; "
                "set residual.heads to a divisor of d_model"
            )
        self.query_init = cfg.query_init or "normal"
        sites = n_sublayers + 1
        self.key_proj = nn.Parameter(torch.empty(sites, 2, d_model, d_model))
        if cfg.query == "learned":
            self.query = nn.Parameter(torch.empty(sites, 2, d_model))
        else:
            self.query_proj = nn.Parameter(torch.empty(sites, 2, d_model, d_model))
        # the model re-initialises every scheme after its sublayers; drawing here from a forked RNG
        # leaves the sublayers' init identical to every other variant's under the same seed
        with torch.random.fork_rng(devices=[]):
            self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.d_model**-0.5
        nn.init.normal_(self.key_proj, std=std)
        q = self.query if hasattr(self, "query") else self.query_proj
        if self.query_init == "zero":
            nn.init.zeros_(q)
        else:
            nn.init.normal_(q, std=1.0 if q.dim() == 3 else std)

    @no_autocast  # key and query projections are matmuls: fp32, not autocast's bf16/fp16
    def attend(self, values: list[Tensor], site: int, which: int, x: Tensor) -> tuple[Tensor, Tensor]:
        """One multi-head attention over ``values``; returns ``(out [..., d], weights [N, ..., H])``."""
        sd = stats_dtype(values[0].dtype)  # fp32 (fp64 for fp64) like every depth read
        w_k = self.key_proj[site, which].to(sd)
        keys = [v.to(sd) @ w_k.T for v in values]  # N × [..., d]
        if hasattr(self, "query"):
            q = self.query[site, which]  # [d]
        else:
            q = x.to(sd) @ self.query_proj[site, which].to(sd).T  # [..., d]
        scale = 1.0 / math.sqrt(self.d_model // self.heads)
        logits = general_depth_logits(keys, q * scale, None, heads=self.heads)  # [N, ..., H]
        weights = general_depth_weights(logits, "softmax")
        return general_depth_mix(values, weights), weights

    def read(self, state: GroupState, site: int) -> Tensor:
        """The two-level read at ``site``."""
        groups = state.all_groups
        x = groups[-1][-1]  # the newest source
        inner = [self.attend(list(g), site, INNER, x) for g in groups]
        out, outer_w = self.attend([summary for summary, _ in inner], site, OUTER, x)
        if self.recorder is not None:
            # the effective weight of each individual source: its group's weight times its own
            weights = torch.cat([w * outer_w[j] for j, (_, w) in enumerate(inner)])  # [N_total, ..., H]
            self.recorder(site, [v for g in groups for v in g], weights)
        return out

    def init_state(self, embedding: Tensor) -> GroupState:
        return GroupState(groups=((embedding,),), current=())

    def layer_input(self, state: GroupState, layer: int) -> Tensor:
        return self.read(state, layer)

    def update(self, state: GroupState, layer: int, out: Tensor) -> GroupState:
        current = (*state.current, to_stream(out, state.groups[0][0]))
        if len(current) == self.block_size:
            return GroupState(groups=(*state.groups, current), current=())
        return GroupState(groups=state.groups, current=current)

    def final(self, state: GroupState) -> Tensor:
        return self.read(state, self.n_sublayers)

    def checkpoint_group(self) -> int:
        """One group of ``S`` sublayers."""
        return self.block_size

    def extra_repr(self) -> str:
        return f"block_size={self.block_size}, heads={self.heads}, query_init={self.query_init}"
