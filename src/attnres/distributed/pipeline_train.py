"""What training needs around :class:`~attnres.distributed.pipeline.PipelineRunner`: the global
gradient norm, and single-process weights and optimiser state assembled from pipeline chunks.

A chunk parameter is a *piece* of a full-model parameter: the whole tensor, or, for the residual
scheme's per-read-site parameters, some of its rows (:meth:`PipelineChunk.global_names`). The pieces
of all chunks assemble into the full tensor, every row exactly once (:func:`assemble`), and slicing
the rows back gives a chunk its piece.

So a pipeline run saves what a single process saves: the full model's weights, and the optimiser
state as the single-process optimisers' ``state_dict()`` (each parameter's Adam moments or Muon
momentum assembled like its weight). A checkpoint written under any layout (one process, DDP,
any ``pp``/``vpp``) resumes under any other, and exactly under the same one.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from attnres.distributed.pipeline import PipelineChunk

Rows = tuple[int, ...] | None  # the rows of the full parameter a piece holds; None: all of it
Piece = tuple[str, Rows, Tensor]  # (full-model parameter name, rows, tensor)


def clip_grad_norm_across(
    params: Sequence[Tensor], max_norm: float, group: dist.ProcessGroup | None = None
) -> Tensor:
    """:func:`torch.nn.utils.clip_grad_norm_` for parameters spread over the ranks of ``group``.

    Each rank holds different parameters, so the norm that decides the clipping is the global one:
    the local squared norms are summed over ranks. Returns that norm (the same on every rank).
    """
    grads = [p.grad for p in params if p.grad is not None]
    squared = torch.nn.utils.get_total_norm(grads).square()
    dist.all_reduce(squared, group=group)
    total = squared.sqrt()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def param_names(chunks: Iterable[PipelineChunk]) -> dict[int, tuple[str, Rows]]:
    """``id(parameter)`` -> (full-model name, rows) for every parameter of ``chunks``."""
    out = {}
    for chunk in chunks:
        names = chunk.global_names()
        out.update({id(p): names[local] for local, p in chunk.named_parameters()})
    return out


def chunk_pieces(chunks: Iterable[PipelineChunk], attr: str = "data") -> list[Piece]:
    """Every parameter's ``attr`` (``"data"`` or ``"grad"``) as a piece, on the CPU."""
    out = []
    for chunk in chunks:
        names = chunk.global_names()
        for local, p in chunk.named_parameters():
            tensor = getattr(p, attr)
            if tensor is None:
                raise ValueError(f"chunk {chunk.index} parameter {local} has no {attr}")
            out.append((*names[local], tensor.detach().cpu()))
    return out


def assemble(like: Mapping[str, Tensor], pieces: Iterable[Piece]) -> dict[str, Tensor]:
    """Full tensors shaped like ``like`` from ``pieces``.

    Raises unless the pieces cover every row of every tensor exactly once, so a lost or doubled
    piece can never pass as a checkpoint.
    """
    out = {name: torch.full_like(t, float("nan"), device="cpu") for name, t in like.items()}
    covered = {name: torch.zeros(t.shape[0] if t.dim() else 1, dtype=torch.int) for name, t in like.items()}
    for name, rows, tensor in pieces:
        if name not in out:
            raise ValueError(f"piece {name!r} is not a parameter of the full model")
        index = ... if rows is None else list(rows)
        if out[name][index].shape != tensor.shape:
            raise ValueError(
                f"piece {name!r} rows {rows} has shape {tuple(tensor.shape)}, not a slice of the full one"
            )
        out[name][index] = tensor
        covered[name][index] += 1
    wrong = [name for name, count in covered.items() if not bool((count == 1).all())]
    if wrong:
        raise ValueError(f"the chunks' pieces do not cover these parameters exactly once: {wrong}")
    return out


def take_rows(full: Tensor, rows: Rows) -> Tensor:
    """A new tensor holding a piece of ``full``: its ``rows``, or all of it (also for a scalar).

    Always a copy: optimisers update their state in place, and two pieces of one parameter on
    one rank must not share, say, Adam's step count (it would advance twice per step).
    """
    return full.clone() if rows is None or full.dim() == 0 else full[list(rows)]


@dataclass(frozen=True)
class OptimizerLayout:
    """How the single-process optimisers index parameters in their ``state_dict()``.

    Attributes:
        groups: per optimiser, its ``param_groups`` as ``state_dict()`` lists them (``params`` are
            indices).
        names: per optimiser, the full-model parameter name at each index.
    """

    groups: list[list[dict[str, Any]]]
    names: list[list[str]]

    @classmethod
    def of(cls, optimizers: Sequence[torch.optim.Optimizer], model: nn.Module) -> OptimizerLayout:
        """The layout of ``optimizers`` built over ``model``'s parameters (no state needed)."""
        by_id = {id(p): name for name, p in model.named_parameters()}
        return cls(
            groups=[opt.state_dict()["param_groups"] for opt in optimizers],
            names=[[by_id[id(p)] for g in opt.param_groups for p in g["params"]] for opt in optimizers],
        )


def _cpu(value: Any) -> Any:
    return value.detach().cpu() if isinstance(value, Tensor) else value


StatePiece = tuple[int, str, Rows, dict[str, Any]]  # (optimiser index, name, rows, that param's state)


def optimizer_pieces(
    optimizers: Sequence[torch.optim.Optimizer], names: Mapping[int, tuple[str, Rows]]
) -> list[StatePiece]:
    """This rank's optimiser state, per parameter, on the CPU (``names``: :func:`param_names`)."""
    return [
        (i, *names[id(p)], {k: _cpu(v) for k, v in opt.state[p].items()})
        for i, opt in enumerate(optimizers)
        for group in opt.param_groups
        for p in group["params"]
        if opt.state.get(p)
    ]


def full_optimizer_state(
    layout: OptimizerLayout, pieces: Iterable[StatePiece], like: Mapping[str, Tensor]
) -> list[dict[str, Any]]:
    """The single-process optimisers' ``state_dict()`` list, assembled from every rank's pieces.

    ``like`` holds the full parameters (for shapes). Per-element state (moments, momentum) is
    assembled row by row like the weights; scalar state (Adam's step count) is the same in every
    piece and taken from the first. The param groups are the layout's, as built (the schedule sets
    ``lr`` before every step).
    """
    by_param: dict[tuple[int, str], list[tuple[Rows, dict[str, Any]]]] = {}
    for i, name, rows, state in pieces:
        by_param.setdefault((i, name), []).append((rows, state))
    out = []
    for i, names in enumerate(layout.names):
        state_dict: dict[int, dict[str, Any]] = {}
        for index, name in enumerate(names):
            parts = by_param.get((i, name))
            if not parts:  # never stepped: no state, as in a single process
                continue
            first = parts[0][1]
            state_dict[index] = {
                key: assemble({name: like[name]}, [(name, rows, s[key]) for rows, s in parts])[name]
                if isinstance(value, Tensor) and value.dim() > 0
                else value
                for key, value in first.items()
            }
        out.append({"state": state_dict, "param_groups": copy.deepcopy(layout.groups[i])})
    return out


def load_chunk_optimizer_state(
    layout: OptimizerLayout,
    full_states: Any,
    optimizers: Sequence[torch.optim.Optimizer],
    names: Mapping[int, tuple[str, Rows]],
) -> None:
    """Load a checkpoint's optimiser state into this rank's chunk optimisers.

    ``full_states`` is what a checkpoint holds: the single-process optimisers' ``state_dict()``s
    (index-keyed, in ``layout``'s order), or FSDP2's ``{"fsdp_full": ...}`` (keyed by parameter
    name). Each chunk parameter gets the rows of its full parameter's state. The chunk optimisers
    keep their own hyperparameters (built from the same config; the schedule sets ``lr`` every step).
    """
    saved_state = _saved_state_lookup(layout, full_states, len(optimizers))
    for i, opt in enumerate(optimizers):
        state_dict = opt.state_dict()
        for k, p in enumerate(p for g in opt.param_groups for p in g["params"]):
            name, rows = names[id(p)]
            saved = saved_state(i, name)
            if saved is not None:
                state_dict["state"][k] = {
                    key: take_rows(v, rows) if isinstance(v, Tensor) else v for key, v in saved.items()
                }
        opt.load_state_dict(state_dict)


def _saved_state_lookup(
    layout: OptimizerLayout, full_states: Any, n_optimizers: int
) -> Callable[[int, str], dict[str, Any] | None]:
    """``(optimiser index, parameter name) -> that parameter's saved state`` (``None``: no state yet)."""
    if isinstance(full_states, dict) and "fsdp_full" in full_states:
        by_name = full_states["fsdp_full"]["state"]
        return lambda _i, name: by_name.get(name)
    if not isinstance(full_states, Sequence) or len(full_states) != n_optimizers:
        raise ValueError(
            "this checkpoint's optimiser state does not match this run's optimisers (was it saved with "
            "a different optim.name?); resume it with the optimiser it was saved with"
        )
    index = [{name: k for k, name in enumerate(names)} for names in layout.names]
    return lambda i, name: full_states[i]["state"].get(index[i][name])
