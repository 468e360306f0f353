"""Single-process tests of pipeline training: assembling weights and optimiser state from chunk
pieces and slicing them back, and the configurations refused up front (no process group needed)."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator

import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

from attnres.cli import main
from attnres.configs import apply_overrides
from attnres.distributed.config import ParallelConfig
from attnres.distributed.data_parallel import DistEnv
from attnres.distributed.pipeline import split_model
from attnres.distributed.pipeline_train import (
    OptimizerLayout,
    assemble,
    chunk_pieces,
    full_optimizer_state,
    load_chunk_optimizer_state,
    optimizer_pieces,
    param_names,
)
from attnres.model import ModelConfig, Transformer
from attnres.residuals import ResidualConfig
from attnres.storage.config import OptimConfig
from attnres.train import get_preset
from attnres.train.engine import PipelineEngine, check_world_size
from attnres.train.optim import build_optimizer

PP, VPP = 2, 2


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Muon's bf16 Newton-Schulz step took 2.5 s on 2 busy threads and 0.01 s on one (tiny model)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=99,
        d_model=32,
        n_layers=3,
        n_heads=2,
        seq_len=7,
        residual=ResidualConfig("block", block_size=2),
    )
    return Transformer(cfg)


def _fake_grads(named: list[tuple[str, torch.nn.Parameter]], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(p.shape, generator=g) for name, p in named}


def _set_chunk_grads(chunks: list, grads: dict[str, torch.Tensor]) -> None:
    for chunk in chunks:
        for local, p in chunk.named_parameters():
            name, rows = chunk.global_names()[local]
            p.grad = grads[name].clone() if rows is None else grads[name][list(rows)].clone()


def test_assemble_refuses_a_missing_or_doubled_piece() -> None:
    model = _model()
    layout, chunks = split_model(model, PP, VPP)
    like = dict(model.named_parameters())
    pieces = chunk_pieces(chunks)
    for name, t in assemble(like, pieces).items():
        torch.testing.assert_close(t, like[name].detach(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="exactly once"):
        assemble(like, pieces[1:])
    with pytest.raises(ValueError, match="exactly once"):
        assemble(like, [*pieces, pieces[-1]])


@pytest.mark.parametrize("saved_as", ["one-process", "fsdp2"])
@pytest.mark.parametrize("optim", ["adamw", "muon"])
def test_optimizer_state_round_trips_through_chunks(optim: str, saved_as: str) -> None:
    """Single-process state -> chunk optimisers -> more steps -> single-process state again.

    The chunk optimisers, loaded from the single-process state, take the same steps as the
    single-process optimiser (bitwise: Adam and Muon act per parameter), and their assembled
    state is the single-process optimiser's. The state may come as FSDP2 checkpoints hold it
    (``{"fsdp_full": ...}``, keyed by parameter name), here made from the same optimisers.
    """
    cfg = OptimConfig(name=optim, lr=1e-2)
    model = _model()
    full = build_optimizer(model.named_parameters(), cfg)
    layout = OptimizerLayout.of(full.optimizers, model)
    named = list(model.named_parameters())
    for step in range(2):  # state to hand over
        grads = _fake_grads(named, step)
        for name, p in named:
            p.grad = grads[name]
        full.step()
    saved = copy.deepcopy([o.state_dict() for o in full.optimizers])  # as torch.load gives it back
    if saved_as == "fsdp2":
        options = StateDictOptions(full_state_dict=True)
        saved = {
            "fsdp_full": copy.deepcopy(get_optimizer_state_dict(model, full.optimizers, options=options))
        }
    _, chunks = split_model(model, PP, VPP)
    ranks = [[c for c in chunks if c.index % PP == r] for r in range(PP)]
    opts = []
    for rank_chunks in ranks:
        names = param_names(rank_chunks)
        params = [p for c in rank_chunks for p in c.parameters()]
        opt = build_optimizer(((names[id(p)][0], p) for p in params), cfg)
        load_chunk_optimizer_state(layout, saved, opt.optimizers, names)
        opts.append((opt, names))

    grads = _fake_grads(named, 2)
    for name, p in named:
        p.grad = grads[name].clone()
    full.step()
    _set_chunk_grads(chunks, grads)
    for opt, _ in opts:
        opt.step()

    for name, t in assemble(dict(named), chunk_pieces(chunks)).items():
        torch.testing.assert_close(t, dict(named)[name].detach(), rtol=0, atol=0, msg=name)
    pieces = [piece for opt, names in opts for piece in optimizer_pieces(opt.optimizers, names)]
    rebuilt = full_optimizer_state(layout, pieces, dict(named))
    for want, got in zip((o.state_dict() for o in full.optimizers), rebuilt, strict=True):
        assert want["state"].keys() == got["state"].keys()
        for index, state in want["state"].items():
            for key, value in state.items():
                torch.testing.assert_close(got["state"][index][key], value, rtol=0, atol=0)
        assert [g["params"] for g in got["param_groups"]] == [g["params"] for g in want["param_groups"]]


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"parallel.pp": "2", "parallel.microbatches": "3"}, "does not split into 3 pipeline micro-batches"),
        (
            {"parallel.pp": "2", "parallel.vpp": "2", "parallel.microbatches": "1"},
            "multiple of parallel.pp=2",
        ),
        ({"parallel.vpp": "2"}, "apply to pipeline runs only"),
        ({"parallel.pp": "2", "parallel.dp_shard": "true"}, "FSDP2"),
        ({"parallel.pp": "0"}, "must be >= 1"),
    ],
    ids=["uneven-microbatches", "interleaved-ragged", "vpp-without-pp", "fsdp2", "zero-stages"],
)
def test_bad_pipeline_configs_are_refused(overrides: dict[str, str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        apply_overrides(get_preset("tiny"), overrides)  # tiny: train.batch_size=4


def test_pipeline_needs_one_process_per_stage(tmp_path, capsys) -> None:
    for world_size in (1, 4):  # no torchrun; pipeline x data parallel
        with pytest.raises(ValueError, match="needs exactly 2 processes"):
            check_world_size(ParallelConfig(pp=2), DistEnv(world_size=world_size), batch_size=4)
    with pytest.raises(SystemExit) as exit_info:  # the CLI refuses before loading any data
        main(["train", "--preset", "tiny", "--out", str(tmp_path / "run"), "--parallel.pp=2"])
    assert exit_info.value.code == 2
    assert "torchrun --nproc-per-node=2" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "model,match",
    [
        ({"tie_embeddings": True}, "tie_embeddings=false"),
        ({"n_layers": 1}, "every chunk needs at least one sublayer"),  # 2 sublayers, 4 chunks
        ({"residual": ResidualConfig("denseformer")}, "residual states that are a DepthState"),
        ({"residual": ResidualConfig("hc")}, "cannot be split over a pipeline"),
    ],
    ids=["tied", "too-few-sublayers", "denseformer", "hyper-connections"],
)
def test_unsplittable_models_are_refused_before_any_communication(model: dict, match: str) -> None:
    """The engine splits the model before it touches a process group, so these need none."""
    cfg = get_preset("tiny")
    cfg = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, **model),
        parallel=ParallelConfig(pp=2, vpp=2),
    )
    with pytest.raises(ValueError, match=match):
        PipelineEngine(Transformer(cfg.model), cfg, DistEnv(rank=0, world_size=2))
