"""Data parallelism under ``torchrun``: DDP, or FSDP2 ``fully_shard`` with ``--parallel.dp_shard``.

The model stays single-device code; :func:`wrap_model` applies the parallelism from outside.
Every rank draws the same global batch and keeps its own contiguous slice (:func:`shard_batch`), so
a run on N ranks sees exactly the batches of a one-process run with the same global batch size,
and the averaged gradients are the same up to the order of the sums.

Checkpoints are always written as full, unsharded state dicts (:func:`full_state_dict`), so they
load back on any world size, including a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from attnres.distributed.pipeline import CACHE_MODES


@dataclass
class ParallelConfig:
    """The ``parallel`` section of a training config.

    Attributes:
        dp_shard: shard parameters, gradients and optimizer state with FSDP2 ``fully_shard``
            (each sublayer, then the root) instead of replicating them with DDP. Only matters
            under ``torchrun`` with more than one process.
        pp: pipeline stages (library API, ``attnres.distributed.PipelineRunner``).
        vpp: virtual pipeline stages per rank.
        attnres_cache: cross-stage caching of AttnRes blocks in the pipeline.
        cache_policy: ``"seen"`` (a rank also keeps the blocks it sealed itself) or ``"received"``
            (the paper's Eq. 8 accounting); used when ``attnres_cache`` is on.
    """

    dp_shard: bool = False
    pp: int = 1
    vpp: int = 1
    attnres_cache: bool = True
    cache_policy: str = "seen"

    def __post_init__(self) -> None:
        if self.pp < 1 or self.vpp < 1:
            raise ValueError(f"parallel.pp and parallel.vpp must be >= 1, got {self.pp} and {self.vpp}")
        if self.cache_policy not in CACHE_MODES[1:]:
            raise ValueError(
                f"parallel.cache_policy must be one of {CACHE_MODES[1:]}, got {self.cache_policy!r}"
            )
        if self.pp * self.vpp > 1:
            raise ValueError(
                "pipeline parallelism is not wired into `attnres train` yet; set parallel.pp=1 and "
                "parallel.vpp=1, or drive attnres.distributed.PipelineRunner from your own loop"
            )

    @property
    def cache(self) -> str:
        """The pipeline cache mode: ``"off"`` or the policy."""
        return self.cache_policy if self.attnres_cache else "off"


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: ``rank`` of ``world_size``, on ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Only rank 0 logs and writes checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "cpu") -> DistEnv:
    """Join the process group ``torchrun`` describes (env ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``).

    Without those variables, or with one process, nothing is initialised and a single-process
    env is returned. CUDA uses NCCL with one GPU per local rank; CPU uses gloo.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistEnv(device=torch.device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistEnv(rank, world_size, local_rank, dev)


def wrap_model(model: nn.Module, cfg: ParallelConfig, env: DistEnv) -> nn.Module:
    """DDP or FSDP2 around ``model`` (already on ``env.device``); the model itself on one process.

    FSDP2 shards each sublayer separately and everything else (embedding, residual scheme, final
    norm, LM head) with the root, so a sublayer's parameters are gathered only while it runs.
    """
    if not env.distributed:
        return model
    if cfg.dp_shard:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(env.device.type, (env.world_size,))
        for sublayer in model.sublayers:
            fully_shard(sublayer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    return DistributedDataParallel(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside a DDP wrapper (FSDP2 modifies the model in place)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def shard_batch(batch: Tensor, env: DistEnv) -> Tensor:
    """This rank's contiguous slice of a global batch ``[B, ...]``; ``B`` must divide evenly."""
    if batch.shape[0] % env.world_size:
        raise ValueError(
            f"global batch size {batch.shape[0]} is not divisible by the {env.world_size} data-parallel "
            "ranks; pick a batch size that is a multiple of --nproc-per-node x nodes"
        )
    return batch.chunk(env.world_size)[env.rank]


def mean_over_ranks(value: Tensor, env: DistEnv) -> Tensor:
    """The mean of a scalar over ranks (for logging the global loss on rank 0)."""
    if not env.distributed:
        return value
    out = value.detach().clone().float()
    dist.all_reduce(out)
    return out / env.world_size


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The unsharded state dict on CPU.

    Under FSDP2 this is a collective (call it on every rank) and only rank 0 gets the tensors;
    the other ranks get an empty dict.
    """
    inner = unwrap(model)
    if any(isinstance(p, torch.distributed.tensor.DTensor) for p in inner.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in inner.state_dict().items()}
