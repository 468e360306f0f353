"""How a training step, an evaluation and a checkpoint run for each parallel layout.

The loop (:func:`attnres.train.loop.train`) is one loop for every layout; it talks to an
:class:`Engine`:

- :class:`ReplicatedEngine`: the whole model in every process: one process, DDP, or FSDP2.
- :class:`PipelineEngine`: ``pp * vpp`` pipeline chunks, one process per stage
  (:mod:`attnres.distributed.pipeline`).

Both start from the same full model (built from the seed, or loaded from a checkpoint), build the
optimiser with the same param-group rules, and save checkpoints in the single-process format. Both
run ``train.precision`` (:class:`attnres.train.precision.Precision`): the model cast first for
``bf16-true``, training and evaluation forwards under its autocast; only the replicated engine
takes ``fp16-mixed`` (its gradient scaler), which the config refuses for pipelines.
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from attnres.distributed.config import ParallelConfig
from attnres.distributed.data_parallel import (
    DistEnv,
    checkpoint_model,
    gradient_sync,
    load_optimizer_state,
    mean_over_ranks,
    optimizer_state,
    shard_batch,
    unwrap,
    wrap_model,
)
from attnres.distributed.pipeline import PipelineRunner, split_model
from attnres.distributed.pipeline_train import (
    OptimizerLayout,
    assemble,
    chunk_pieces,
    clip_grad_norm_across,
    full_optimizer_state,
    load_chunk_optimizer_state,
    optimizer_pieces,
    param_names,
)
from attnres.model import Transformer, lm_loss
from attnres.model.transformer import IGNORE_INDEX
from attnres.storage.config import TrainConfig
from attnres.train.optim import OptimizerGroup, build_optimizer
from attnres.train.precision import Precision

Batch = tuple[Tensor, Tensor]
#: makes the context a forward runs in (``Precision.autocast``)
Autocast = Callable[[], AbstractContextManager[Any]]


@dataclass(frozen=True)
class StepStats:
    """What one optimiser step reports, the same on every rank.

    Attributes:
        loss: the global batch's mean loss.
        grad_norm: the global gradient norm before clipping, as the clipping computed it (no
            extra pass); ``None`` when clipping is off (``optim.grad_clip=0``).
    """

    loss: float
    grad_norm: float | None


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: list[Batch], device: torch.device, autocast: Autocast = contextlib.nullcontext
) -> float:
    """Token-weighted mean validation loss."""
    total, count = loss_sums(model, batches, device, autocast)
    return total / count


@torch.no_grad()
def loss_sums(
    model: nn.Module, batches: list[Batch], device: torch.device, autocast: Autocast = contextlib.nullcontext
) -> tuple[float, int]:
    """Summed token losses and the number of tokens over ``batches`` (none: ``(0.0, 0)``).

    ``autocast`` makes the context each forward and loss run in (the run's precision).
    """
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast():
            loss = lm_loss(model(x), y)
        total += loss.item() * y.numel()
        count += y.numel()
    model.train()
    return total, count


def check_world_size(parallel: ParallelConfig, env: DistEnv, batch_size: int, grad_accum: int = 1) -> None:
    """Before any work: refuse a pipeline whose stage count is not the number of processes, and a
    data-parallel run whose global batch of ``batch_size`` sequences does not split over the ranks,
    or whose per-rank share does not split into ``grad_accum`` micro-batches."""
    if not parallel.pipeline and batch_size % env.world_size:
        raise ValueError(
            f"train.batch_size={batch_size} is not divisible by the {env.world_size} data-parallel "
            "ranks; pick a batch size that is a multiple of --nproc-per-node x nodes"
        )
    if not parallel.pipeline and (batch_size // env.world_size) % grad_accum:
        raise ValueError(
            f"each of the {env.world_size} data-parallel ranks gets {batch_size // env.world_size} "
            f"sequences of train.batch_size={batch_size}, which do not split into train.grad_accum="
            f"{grad_accum} equal micro-batches; make batch_size a multiple of ranks x grad_accum"
        )
    if parallel.pipeline and env.world_size != parallel.pp:
        raise ValueError(
            f"parallel.pp={parallel.pp} needs exactly {parallel.pp} processes (torchrun "
            f"--nproc-per-node={parallel.pp}), one per pipeline stage; this run has {env.world_size}. "
            "Pipeline and data parallelism do not combine yet: launch pp processes, or set "
            "parallel.pp=1 for DDP/FSDP2 over all processes"
        )


class Engine(ABC):
    """One layout's way of running the loop's steps. Every method is called on every rank."""

    optimizer: OptimizerGroup
    #: the run's ``train.precision``: autocast, gradient scaler, weight dtype
    precision: Precision
    #: how the run is parallelised, for the start-of-run log line ("" for one process)
    description: str

    @abstractmethod
    def train_step(self, x: Tensor, y: Tensor) -> StepStats:
        """Forward, backward, gradient clipping and optimiser step on the global batch ``[B, T]``.

        Returns the batch's mean loss and the gradient norm, the same on every rank.
        """

    @abstractmethod
    def evaluate(self, batches: list[Batch]) -> float:
        """Token-weighted mean loss over ``batches``, forward only."""

    @abstractmethod
    def checkpoint_state(self) -> tuple[nn.Module | None, Any]:
        """The plain full model and the optimiser state to save; ``(None, None)`` off rank 0.

        Both are in the single-process format, so any layout can load them.
        """

    @abstractmethod
    def load_optimizer_state(self, state: Any) -> None:
        """Restore what :meth:`checkpoint_state` saved (from this or another layout)."""

    def loss_scale(self) -> float | None:
        """The fp16 gradient scaler's current scale, ``None`` without one (logged per step)."""
        return self.precision.loss_scale()


class ReplicatedEngine(Engine):
    """The whole model in each process: one process, or DDP / FSDP2 over ``env.world_size`` ranks.

    Each rank trains on its slice of the global batch (:func:`shard_batch`), in ``train.grad_accum``
    micro-steps whose gradients are reduced over ranks once, on the last. The model recomputes
    activations in the backward as ``train.activation_checkpointing`` says.
    """

    def __init__(self, model: Transformer, cfg: TrainConfig, env: DistEnv) -> None:
        self.env, self.grad_clip, self.model_cfg = env, cfg.optim.grad_clip, cfg.model
        self.dp_shard, self.grad_accum = cfg.parallel.dp_shard, cfg.train.grad_accum
        self.precision = Precision(cfg.train.precision, env.device)
        model.set_activation_checkpointing(cfg.train.activation_checkpointing)
        self.model = wrap_model(self.precision.prepare(model), cfg.parallel.dp_shard, env)
        # what train and evaluation steps call: the wrapped model, compiled after wrapping (torch's
        # order for DDP, whose graph then breaks at gradient buckets, and for FSDP2)
        self.forward: nn.Module = torch.compile(self.model) if cfg.train.compile else self.model
        self.optimizer = build_optimizer(unwrap(self.model).named_parameters(), cfg.optim)
        kind = "FSDP2" if cfg.parallel.dp_shard else "DDP"
        self.description = f"{env.world_size} {kind} ranks" if env.distributed else ""
        if cfg.train.compile:
            self.description = ", ".join(filter(None, [self.description, "torch.compile"]))

    def train_step(self, x: Tensor, y: Tensor) -> StepStats:
        x, y = (shard_batch(t, self.env).to(self.env.device) for t in (x, y))
        # the token mean over this rank's whole batch (check_world_size made the split even): each
        # micro-batch adds its token sum / the batch's count, so unequal counts weigh right too
        count = (y != IGNORE_INDEX).sum()
        micro = list(zip(x.chunk(self.grad_accum), y.chunk(self.grad_accum), strict=True))
        parts = []
        for i, (xm, ym) in enumerate(micro):
            with gradient_sync(self.model, enabled=i == len(micro) - 1):
                with self.precision.autocast():
                    part = lm_loss(self.forward(xm), ym, reduction="sum") / count
                self.precision.backward(part)  # outside autocast, as torch.amp recommends
            parts.append(part.detach())
        loss = sum(parts[1:], parts[0])
        norm = None
        if self.grad_clip:  # DDP: gradients are averaged already, so every rank has the global norm
            self.precision.unscale(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            if isinstance(norm, DTensor):  # FSDP2: each rank holds a partial norm; a collective
                norm = norm.full_tensor()
        self.precision.step(self.optimizer)
        self.optimizer.zero_grad()
        loss = mean_over_ranks(loss, self.env).detach().float()
        if norm is None:
            return StepStats(loss.item(), None)
        loss_value, norm_value = torch.stack([loss, norm.float()]).tolist()  # one device sync
        return StepStats(loss_value, norm_value)

    def evaluate(self, batches: list[Batch]) -> float:
        env = self.env
        autocast = self.precision.autocast
        if not env.distributed or self.dp_shard:  # FSDP2's forward is a collective: all run all
            return evaluate(self.forward, batches, env.device, autocast)
        # DDP: each rank evaluates every world_size-th batch on the plain module, then the sums meet
        mine = batches[env.rank :: env.world_size]
        total, count = loss_sums(unwrap(self.model), mine, env.device, autocast)
        sums = torch.tensor([total, count], dtype=torch.float64, device=env.device)
        dist.all_reduce(sums)
        return float(sums[0] / sums[1])

    def checkpoint_state(self) -> tuple[nn.Module | None, Any]:
        # a collective under FSDP2; building the model draws an init, which training must not see
        with torch.random.fork_rng(devices=[]):
            plain = checkpoint_model(self.model, lambda: Transformer(self.model_cfg))
        state = optimizer_state(self.model, self.optimizer.optimizers)
        return (plain, state) if self.env.is_main else (None, None)

    def load_optimizer_state(self, state: Any) -> None:
        load_optimizer_state(self.model, self.optimizer.optimizers, state)


class PipelineEngine(Engine):
    """This rank's ``vpp`` pipeline chunks of the model, with their own optimiser.

    - The chunks are cut from the full model every rank builds, so the init is the single-process one.
    - Each parameter is named as in the full model when the optimiser is built, so the param-group
      rules (no decay for residual parameters and norms, Muon for sublayer matrices) are the same.
    - Gradients are clipped by the norm over all ranks (:func:`clip_grad_norm_across`).
    - A step splits the batch into ``parallel.n_microbatches`` micro-batches; evaluation runs
      forward only, in ``gcd(batch, n_microbatches)`` micro-batches (the last validation batch
      may be smaller).
    - Checkpoints gather every rank's weights and optimiser state to rank 0 and assemble the
      single-process ones (:mod:`attnres.distributed.pipeline_train`).
    """

    def __init__(self, model: Transformer, cfg: TrainConfig, env: DistEnv) -> None:
        par = cfg.parallel
        self.env, self.grad_clip, self.model_cfg = env, cfg.optim.grad_clip, cfg.model
        self.microbatches = par.n_microbatches
        self.precision = Precision(cfg.train.precision, env.device)  # no scaler: the config refuses fp16
        model.set_activation_checkpointing(cfg.train.activation_checkpointing)  # the chunks copy it
        layout, self.chunks = split_model(self.precision.prepare(model), par.pp, par.vpp, rank=env.rank)
        cache = "seen" if par.attnres_cache else "off"
        self.runner = PipelineRunner(self.chunks, layout, cache=cache, autocast=self.precision.autocast)
        self.names = param_names(self.chunks)
        self.params = [p for chunk in self.chunks for p in chunk.parameters()]
        self.optimizer = build_optimizer(((self.names[id(p)][0], p) for p in self.params), cfg.optim)
        # the single-process optimisers' parameter order: the format checkpoints are written in
        self.full_optimizer = OptimizerLayout.of(
            build_optimizer(model.named_parameters(), cfg.optim).optimizers, model
        )
        schedule = "GPipe" if par.vpp == 1 else "interleaved 1F1B"
        self.description = (
            f"pipeline pp={par.pp} x vpp={par.vpp} ({schedule}, {self.microbatches} micro-batches, "
            f"cross-stage cache {'on' if par.attnres_cache else 'off'})"
        )

    def train_step(self, x: Tensor, y: Tensor) -> StepStats:
        loss, _ = self.runner.step(x.to(self.env.device), y.to(self.env.device), self.microbatches)
        norm = clip_grad_norm_across(self.params, self.grad_clip) if self.grad_clip else None
        self.optimizer.step()
        self.optimizer.zero_grad()
        return StepStats(loss, None if norm is None else norm.item())

    def evaluate(self, batches: list[Batch]) -> float:
        for chunk in self.chunks:
            chunk.eval()
        total, count = 0.0, 0
        for x, y in batches:
            m = math.gcd(x.shape[0], self.microbatches)
            total += self.runner.forward_loss(x.to(self.env.device), y.to(self.env.device), m) * y.numel()
            count += y.numel()
        for chunk in self.chunks:
            chunk.train()
        return total / count

    def checkpoint_state(self) -> tuple[nn.Module | None, Any]:
        mine = (chunk_pieces(self.chunks), optimizer_pieces(self.optimizer.optimizers, self.names))
        gathered: list[Any] | None = [None] * self.env.world_size if self.env.is_main else None
        dist.gather_object(mine, gathered, dst=0)
        if gathered is None:
            return None, None
        with torch.random.fork_rng(devices=[]):  # building a model draws an init; training must not see it
            plain = self.precision.prepare(Transformer(self.model_cfg))  # the chunks' weight dtype
        like = dict(plain.named_parameters())
        plain.load_state_dict(assemble(like, [p for weights, _ in gathered for p in weights]))
        state = full_optimizer_state(self.full_optimizer, [p for _, opt in gathered for p in opt], like)
        return plain, state

    def load_optimizer_state(self, state: Any) -> None:
        load_chunk_optimizer_state(self.full_optimizer, state, self.optimizer.optimizers, self.names)


def build_engine(model: Transformer, cfg: TrainConfig, env: DistEnv) -> Engine:
    """The engine for ``cfg.parallel``, starting from ``model`` (on ``env.device``, weights final)."""
    return PipelineEngine(model, cfg, env) if cfg.parallel.pipeline else ReplicatedEngine(model, cfg, env)
