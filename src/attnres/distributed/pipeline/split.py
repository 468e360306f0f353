"""Cutting a :class:`Transformer` into pipeline chunks from the outside.

Chunk ``c`` owns a contiguous range of ``model.sublayers`` (plus ``embed`` on chunk 0, ``norm`` and
``lm_head`` on chunk ``C-1``), and the rows of the residual scheme's per-read-site parameters
(``query[l]``, ``key_gain[l]``) for the read sites it executes. Everything else is deleted. A chunk
runs its sublayers through the model's own loop (:meth:`Transformer.run_sublayers`), indexed by
global sublayer and read-site ids, so the model stays single-device code.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

from torch import Tensor, nn

from attnres.distributed.pipeline.layout import PipelineLayout, make_layout
from attnres.distributed.pipeline.state import BlockState, state_tensors
from attnres.model import Transformer
from attnres.ops.dispatch import select_impl, use_impl


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


class OwnedSublayers(nn.ModuleList):
    """The sublayers ``start, start+1, …`` of one chunk, indexed by their global sublayer id.

    Like :class:`SiteRows` for the residual parameters: the model's loop reads ``sublayers[l]``
    with the global ``l``, and an unowned sublayer is an error. Parameters keep their local names
    (``sublayers.0.…``); :meth:`PipelineChunk.global_names` maps them back.
    """

    def __init__(self, modules: Iterable[nn.Module], start: int) -> None:
        super().__init__(modules)
        self.start = start

    def __getitem__(self, layer: int) -> nn.Module:
        if not isinstance(layer, int):
            raise TypeError(f"a chunk's sublayers are indexed by one global sublayer id, got {layer!r}")
        if not self.start <= layer < self.start + len(self):
            raise IndexError(
                f"sublayer {layer} belongs to another pipeline chunk "
                f"(this one owns {self.start} … {self.start + len(self) - 1})"
            )
        return super().__getitem__(layer - self.start)


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
        self.sublayers = OwnedSublayers(
            (copy.deepcopy(model.sublayers[i]) for i in range(self.start, self.stop)), self.start
        )
        self.residual = _slice_residual(model.residual, self.sites, L + 1)
        self.norm = copy.deepcopy(model.norm) if self.is_last else None
        #: as the model's (``Transformer.set_activation_checkpointing`` before splitting)
        self.activation_checkpointing = model.activation_checkpointing
        self.lm_head = copy.deepcopy(model.lm_head) if self.is_last else None
        self.register_buffer("rope_cos", model.rope_cos.clone(), persistent=False)
        self.register_buffer("rope_sin", model.rope_sin.clone(), persistent=False)

    def forward(self, inp: Any) -> Any:
        impl = self.read_impl()
        # Why use_impl: it is how this chunk's read implementation reaches the scheme's
        # init_state on chunk 0 (the scheme chooses it there, for the whole forward). A read
        # strategy passed to the scheme (issue 14 item 2) would replace it.
        with use_impl(impl):
            if self.is_first:
                Transformer.check_tokens(self, inp)  # only reads self.cfg
                state = self.residual.init_state(self.embed(inp))
            else:
                state = self._arrived(inp, impl)
            T = state_tensors(state)[-1].shape[1]
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]
            # the model's own loop, with this chunk as the model: it reads only the checkpointing mode,
            # self.residual and self.sublayers[l] by global sublayer id (OwnedSublayers)
            state = Transformer.run_segment(self, state, self.start, self.stop, cos, sin)
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
        # Why the pipeline picks the implementation itself: it must rewrite two_phase, and the
        # choice is made inside the scheme (ops.dispatch.select_impl on the scheme's config) until a
        # read strategy is an object chosen once per forward (issue 14 item 2).
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
        # Why the pipeline sets the state's impl: a received state is built from its tensors alone
        # (reference reads), and only the scheme's init_state sets the implementation; the typed
        # residual state (issue 14 item 2) would build it for this chunk's reads directly.
        if not isinstance(state, BlockState) or state.impl == impl:
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
