"""Data parallelism under ``torchrun``: DDP, or FSDP2 ``fully_shard`` with ``--parallel.dp_shard``.

The model stays single-device code; :func:`wrap_model` applies the parallelism from outside.
Every rank draws the same global batch and keeps its own contiguous slice (:func:`shard_batch`), so
a run on N ranks sees exactly the batches of a one-process run with the same global batch size,
and the averaged gradients are the same up to the order of the sums.

Checkpoints are always written as full, unsharded state dicts (:func:`full_state_dict`), so they
load back on any world size, including a single process.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel


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
        """More than one process (a process group is initialised)."""
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


def wrap_model(model: nn.Module, dp_shard: bool, env: DistEnv) -> nn.Module:
    """DDP or FSDP2 around ``model`` (already on ``env.device``); the model itself on one process.

    FSDP2 shards each sublayer separately and everything else (embedding, residual scheme, final
    norm, LM head) with the root, so a sublayer's parameters are gathered only while it runs.
    """
    if not env.distributed:
        return model
    if dp_shard:
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


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Run a forward and backward of ``model`` that reduces gradients over ranks only if ``enabled``.

    Gradient accumulation disables it on all micro-steps but the last, whose reduction then
    covers the summed gradients: DDP's ``no_sync()``, FSDP2's ``set_requires_gradient_sync(False)``
    (restored to ``True`` on exit). A model that is not wrapped (one process) has nothing to skip.
    """
    from torch.distributed.fsdp import FSDPModule

    if enabled:
        yield
    elif isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


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
    if _sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in inner.state_dict().items()}


def _sharded(model: nn.Module) -> bool:
    return any(isinstance(p, torch.distributed.tensor.DTensor) for p in unwrap(model).parameters())


def checkpoint_model(model: nn.Module, build: Callable[[], nn.Module]) -> nn.Module | None:
    """A plain module with the full weights, for writing a world-size-independent checkpoint.

    DDP and single process: the user's model itself. FSDP2 (a collective): ``build()`` filled with
    the gathered weights on rank 0, ``None`` on the other ranks.
    """
    if not _sharded(model):
        return unwrap(model)
    state = full_state_dict(model)
    if not state:
        return None
    plain = build()
    plain.load_state_dict(state)
    return plain


def optimizer_state(model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> Any:
    """Optimiser states to save; under FSDP2 a collective returning the full (unsharded) state."""
    if not _sharded(model):
        return [opt.state_dict() for opt in optimizers]
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {"fsdp_full": get_optimizer_state_dict(unwrap(model), optimizers, options=options)}


def load_optimizer_state(model: nn.Module, optimizers: list[torch.optim.Optimizer], state: Any) -> None:
    """Inverse of :func:`optimizer_state`, on any world size and with or without FSDP2."""
    full = isinstance(state, dict) and "fsdp_full" in state
    if not full and not _sharded(model):
        if len(state) != len(optimizers):
            raise ValueError(f"checkpoint has {len(state)} optimiser states, this run has {len(optimizers)}")
        for opt, s in zip(optimizers, state, strict=True):
            opt.load_state_dict(s)
        return
    if not full:
        raise ValueError(
            "this checkpoint's optimiser state was saved without FSDP2; resume it with "
            "--parallel.dp_shard=false (DDP or one process), or start a new run"
        )
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
    set_optimizer_state_dict(unwrap(model), optimizers, state["fsdp_full"], options=options)
