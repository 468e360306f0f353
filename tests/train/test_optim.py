"""Optimiser grouping and learning-rate schedules."""

from __future__ import annotations

import pytest
import torch

from attnres.model import ModelConfig, Transformer
from attnres.residuals import ResidualConfig
from attnres.storage.config import OptimConfig, ScheduleConfig
from attnres.train.optim import build_optimizer, lr_multiplier


def test_residual_params_and_norms_are_not_decayed() -> None:
    model = Transformer(ModelConfig(d_model=32, n_heads=2, residual=ResidualConfig("full")))
    opt = build_optimizer(model.named_parameters(), OptimConfig(name="adamw", weight_decay=0.1))
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(model.residual.query) in no_decay and id(model.residual.key_gain) in no_decay
    assert id(model.norm.weight) in no_decay and id(model.sublayers[0].wq.weight) not in no_decay


def test_muon_takes_sublayer_matrices_only() -> None:
    model = Transformer(ModelConfig(d_model=32, n_heads=2, residual=ResidualConfig("block")))
    opt = build_optimizer(model.named_parameters(), OptimConfig(name="muon"))
    muon, adam = opt.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adam, torch.optim.AdamW)
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    assert id(model.sublayers[1].w_up.weight) in muon_ids
    assert id(model.embed.weight) not in muon_ids and id(model.residual.query) not in muon_ids
    all_ids = muon_ids | {id(p) for g in adam.param_groups for p in g["params"]}
    assert all_ids == {id(p) for p in model.parameters()}


@pytest.mark.parametrize("name", ["cosine", "wsd", "constant"])
def test_schedules(name: str) -> None:
    cfg = ScheduleConfig(name=name, warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.2)
    values = [lr_multiplier(s, 100, cfg) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(0.1 - 1e-9 <= v <= 1.0 for v in values[10:])
    if name == "wsd":
        assert values[79] == 1.0 and values[99] == pytest.approx(0.1)
    if name == "cosine":
        assert values[99] == pytest.approx(0.1, abs=1e-3) and values[50] < values[20]
