"""DDP and FSDP2 on 2 gloo processes against one process with the same global batch.

Tolerance: fp32, AdamW with lr 1e-2 for 3 steps. Gradients differ only in the order of sums
(~1e-7 relative), but Adam divides by sqrt(v), so near-zero gradients turn such differences into
parameter differences up to ~1e-6 absolute; we allow 1e-5 absolute (0.1% of one lr-sized step).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from attnres.distributed.config import ParallelConfig
from attnres.distributed.data_parallel import (
    DistEnv,
    full_state_dict,
    shard_batch,
    wrap_model,
)
from attnres.distributed.launch import spawn_gloo
from attnres.model import ModelConfig, Transformer, lm_loss
from attnres.residuals import ResidualConfig
from attnres.storage.config import LoopConfig, OptimConfig, TrainConfig
from attnres.train.engine import ReplicatedEngine, check_world_size

STEPS, BATCH = 3, 4


def _setup() -> tuple[Transformer, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=99,
        d_model=32,
        n_layers=2,
        n_heads=4,
        seq_len=7,
        residual=ResidualConfig("block", block_size=3),
    )
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(STEPS):
        seq = torch.randint(0, 99, (BATCH, 8), generator=g)
        batches.append((seq[:, :-1], seq[:, 1:]))
    return Transformer(cfg), batches


def _train(model: torch.nn.Module, batches: list, env: DistEnv) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses = []
    for tokens, targets in batches:
        loss = lm_loss(model(shard_batch(tokens, env)), shard_batch(targets, env))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        global_loss = loss.detach().clone()
        if env.distributed:
            torch.distributed.all_reduce(global_loss)
        losses.append(float(global_loss) / env.world_size)
    return losses


def _worker(rank: int, world_size: int, dp_shard: bool, out: str) -> None:
    model, batches = _setup()
    env = DistEnv(rank=rank, world_size=world_size)
    wrapped = wrap_model(model, dp_shard, env)
    losses = _train(wrapped, batches, env)
    state = full_state_dict(wrapped)  # collective under FSDP2
    if rank == 0:
        torch.save((losses, state), out)


@pytest.mark.distributed
@pytest.mark.parametrize("dp_shard", [False, True], ids=["ddp", "fsdp2"])
def test_data_parallel_matches_one_process(dp_shard: bool) -> None:
    model, batches = _setup()
    ref_losses = _train(model, batches, DistEnv())
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "dp.pt")
        spawn_gloo(_worker, 2, dp_shard, out)
        losses, state = torch.load(out)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
    ref_state = model.state_dict()
    assert state.keys() == ref_state.keys()
    for name, p in ref_state.items():
        torch.testing.assert_close(state[name], p, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    moved = max(float((state[n] - p).abs().max()) for n, p in Transformer(model.cfg).state_dict().items())
    assert moved > 1e-3  # the check is not vacuous: training moved the parameters


def _engine_run(env: DistEnv, dp_shard: bool, grad_accum: int, checkpointing: str) -> tuple[list, dict, list]:
    """STEPS engine steps; returns the losses, the full state and the DDP buckets reduced, in order."""
    model, batches = _setup()
    cfg = TrainConfig(
        model=model.cfg,
        optim=OptimConfig(lr=1e-2),
        train=LoopConfig(batch_size=BATCH, grad_accum=grad_accum, activation_checkpointing=checkpointing),
        parallel=ParallelConfig(dp_shard=dp_shard),
    )
    engine = ReplicatedEngine(model, cfg, env)
    reduced: list[int] = []
    if isinstance(engine.model, torch.nn.parallel.DistributedDataParallel):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def counting_hook(state, bucket):
            reduced.append(bucket.index())
            return allreduce_hook(state, bucket)

        engine.model.register_comm_hook(None, counting_hook)
    losses = [engine.train_step(x, y).loss for x, y in batches]
    return losses, full_state_dict(engine.model), reduced


def _accum_worker(rank: int, world_size: int, dp_shard: bool, out: str) -> None:
    result = _engine_run(DistEnv(rank=rank, world_size=world_size), dp_shard, 2, "block")
    if rank == 0:
        torch.save(result, out)


@pytest.mark.distributed
@pytest.mark.parametrize("dp_shard", [False, True], ids=["ddp", "fsdp2"])
def test_accumulation_and_checkpointing_under_data_parallel(dp_shard: bool) -> None:
    """2 ranks x 2 micro-steps with block checkpointing = one process, one pass per step; DDP
    reduces each bucket once per step (``no_sync`` on the first micro-step)."""
    ref_losses, ref_state, _ = _engine_run(DistEnv(), False, 1, "none")
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "dp.pt")
        spawn_gloo(_accum_worker, 2, dp_shard, out)
        losses, state, reduced = torch.load(out)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
    for name, p in ref_state.items():
        torch.testing.assert_close(state[name], p, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    if not dp_shard:
        assert reduced and len(reduced) == STEPS * len(set(reduced))


def test_shard_batch_refuses_uneven_batches() -> None:
    with pytest.raises(ValueError, match="not divisible by the 2 data-parallel ranks"):
        shard_batch(torch.zeros(3, 4), DistEnv(rank=0, world_size=2))
    torch.testing.assert_close(
        shard_batch(torch.arange(4), DistEnv(rank=1, world_size=2)), torch.tensor([2, 3])
    )


def test_uneven_batches_are_refused_before_any_work() -> None:
    with pytest.raises(ValueError, match="batch_size=4 is not divisible by the 3 data-parallel ranks"):
        check_world_size(ParallelConfig(), DistEnv(world_size=3), batch_size=4)
    check_world_size(ParallelConfig(), DistEnv(world_size=2), batch_size=4)
