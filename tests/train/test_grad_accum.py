"""Gradient accumulation (``train.grad_accum``) and activation checkpointing in training.

K micro-steps of B/K sequences must be the optimiser step of one forward over all B: the same
token-mean loss (each micro-batch's token sum over the whole batch's count), the same clipping and
the same AdamW update. At fp64 only the order of sums differs (bound 1e-12).
"""

from __future__ import annotations

import json

import pytest
import torch

from attnres.configs import apply_overrides
from attnres.distributed.config import ParallelConfig
from attnres.distributed.data_parallel import DistEnv
from attnres.model import ModelConfig, Transformer
from attnres.model.transformer import IGNORE_INDEX
from attnres.residuals import ResidualConfig
from attnres.storage.checkpoint import load_model
from attnres.storage.config import LoopConfig, OptimConfig, TrainConfig
from attnres.train import get_preset, train
from attnres.train.engine import ReplicatedEngine, check_world_size


def _engine(grad_accum: int, checkpointing: str = "none", variant: str = "block") -> ReplicatedEngine:
    torch.manual_seed(0)
    model_cfg = ModelConfig(
        vocab_size=61,
        d_model=16,
        n_layers=2,
        n_heads=2,
        seq_len=9,
        residual=ResidualConfig.for_variant(variant, block_size=3),
    )
    cfg = TrainConfig(
        model=model_cfg,
        optim=OptimConfig(lr=1e-2, grad_clip=0.5),  # small enough to clip: the norm is the whole step's
        train=LoopConfig(batch_size=8, grad_accum=grad_accum, activation_checkpointing=checkpointing),
    )
    return ReplicatedEngine(Transformer(model_cfg).double(), cfg, DistEnv())


def _batch(ignore: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    seq = torch.randint(0, 61, (8, 10), generator=torch.Generator().manual_seed(1))
    x, y = seq[:, :-1], seq[:, 1:].clone()
    if ignore:  # micro-batches (2 rows each) of different target counts: 18, 13, 7 and 1
        y[2, :5] = y[4, :9] = y[5, :2] = y[6:, :8] = y[7, 8] = IGNORE_INDEX
    return x, y


def _params(engine: ReplicatedEngine) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in engine.model.parameters()])


@pytest.mark.parametrize("ignore", [False, True], ids=["equal-counts", "unequal-counts"])
@pytest.mark.parametrize("checkpointing", ["none", "block"])
def test_accumulation_is_the_step_of_the_whole_batch(ignore: bool, checkpointing: str) -> None:
    whole, accum = _engine(1), _engine(4, checkpointing)
    before = _params(whole)
    assert torch.equal(before, _params(accum))
    x, y = _batch(ignore)
    loss_whole, loss_accum = whole.train_step(x, y).loss, accum.train_step(x, y).loss
    assert loss_accum == pytest.approx(loss_whole, rel=1e-12)
    a, b = _params(whole), _params(accum)
    assert (a - before).abs().max() > 1e-3  # the step moved the parameters
    assert ((a - b).abs().max() / (a - before).abs().max()).item() <= 1e-12


def _tiny(cache_dir: str, **overrides: str) -> TrainConfig:
    return apply_overrides(get_preset("tiny"), {"data.cache_dir": cache_dir, **overrides})


def _losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_training_with_accumulation_matches_the_whole_batch(tmp_path, cache_dir) -> None:
    """fp32 through train(): each step's loss within 1e-6 of the run with one pass per step."""
    train(_tiny(cache_dir), tmp_path / "whole", log=lambda _: None)
    overrides = {"train.grad_accum": "4", "train.activation_checkpointing": "block"}
    train(_tiny(cache_dir, **overrides), tmp_path / "accum", log=lambda _: None)
    whole, accum = _losses(tmp_path / "whole"), _losses(tmp_path / "accum")
    assert len(whole) == len(accum) == 20
    assert max(abs(a - b) for a, b in zip(whole, accum, strict=True)) <= 1e-6


def test_resume_with_accumulation_is_exact(tmp_path, cache_dir) -> None:
    cfg = _tiny(cache_dir, **{"train.grad_accum": "4", "train.steps": "8"})
    train(cfg, tmp_path / "straight", log=lambda _: None)
    train(cfg, tmp_path / "split", log=lambda _: None, stop_after=3)
    train(cfg, tmp_path / "split", resume=True, log=lambda _: None)
    assert _losses(tmp_path / "split") == _losses(tmp_path / "straight")
    a, _ = load_model(tmp_path / "straight")
    b, _ = load_model(tmp_path / "split")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_resume_may_change_accumulation_and_checkpointing(tmp_path, cache_dir) -> None:
    """They change how a step is computed, not the step: the losses agree up to rounding."""
    cfg = _tiny(cache_dir, **{"train.steps": "6"})
    train(cfg, tmp_path / "straight", log=lambda _: None)
    train(cfg, tmp_path / "split", log=lambda _: None, stop_after=3)
    changed = _tiny(cache_dir, **{"train.steps": "6", "train.grad_accum": "2"})
    changed.train.activation_checkpointing = "sublayer"
    train(changed, tmp_path / "split", resume=True, log=lambda _: None)
    split, straight = _losses(tmp_path / "split"), _losses(tmp_path / "straight")
    assert split[:3] == straight[:3]
    assert max(abs(a - b) for a, b in zip(split, straight, strict=True)) <= 1e-5


def test_bad_settings_are_refused_with_the_valid_values() -> None:
    with pytest.raises(ValueError, match="train.grad_accum must be >= 1"):
        LoopConfig(grad_accum=0)
    with pytest.raises(ValueError, match="batch_size=4 does not split into train.grad_accum=3"):
        LoopConfig(batch_size=4, grad_accum=3)
    with pytest.raises(
        ValueError, match="activation_checkpointing='layer' is not one of: none, sublayer, block"
    ):
        LoopConfig(activation_checkpointing="layer")
    with pytest.raises(ValueError, match="parallel.microbatches"):
        TrainConfig(train=LoopConfig(batch_size=8, grad_accum=2), parallel=ParallelConfig(pp=2))
    # pipeline chunks run the model's checkpointed loop (tests/distributed/test_pipeline_split.py)
    TrainConfig(train=LoopConfig(activation_checkpointing="block"), parallel=ParallelConfig(pp=2))
    # 8 sequences over 4 ranks leave 2 per rank, which do not split into 4 micro-batches
    with pytest.raises(ValueError, match="gets 2 sequences .* do not split into train.grad_accum=4"):
        check_world_size(ParallelConfig(), DistEnv(world_size=4), batch_size=8, grad_accum=4)
    check_world_size(ParallelConfig(), DistEnv(world_size=2), batch_size=8, grad_accum=4)
