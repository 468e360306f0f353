"""Activation checkpointing (``Transformer.set_activation_checkpointing``): same gradients, less kept.

Gradients are compared at fp64 with a 1e-12 relative bound: recomputation replays the same ops on
the same inputs, so only the order of gradient sums may differ.
"""

from __future__ import annotations

import pytest
import torch

from attnres.bench.measure import step_memory
from attnres.model import ModelConfig, Transformer, lm_loss
from attnres.model.cache import KVCache
from attnres.residuals import ResidualConfig, variant_names


def _model(variant: str, impl: str = "auto", block_size: int | None = 3, n_layers: int = 3) -> Transformer:
    torch.manual_seed(0)
    residual = ResidualConfig.for_variant(variant, block_size=block_size, impl=impl)
    cfg = ModelConfig(vocab_size=61, d_model=16, n_layers=n_layers, n_heads=2, seq_len=9, residual=residual)
    model = Transformer(cfg).double()
    with torch.no_grad():  # non-zero queries and gates, so every read weighs its sources differently
        for name, p in model.residual.named_parameters():
            p.add_(torch.randn_like(p), alpha=0.5) if "gain" not in name else None
    return model


def _grads(model: Transformer, mode: str, tokens: torch.Tensor) -> tuple[float, torch.Tensor]:
    model.set_activation_checkpointing(mode)
    model.zero_grad(set_to_none=True)
    loss = lm_loss(model(tokens[:, :-1]), tokens[:, 1:])
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])


def _tokens() -> torch.Tensor:
    return torch.randint(0, 61, (2, 10), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("impl", ["fused", "two_phase"])
@pytest.mark.parametrize(
    "variant,block_size", [("prenorm", None), ("block", 3), ("block", 2), ("full", None)]
)
@pytest.mark.parametrize("mode", ["sublayer", "block"])
def test_gradients_equal_no_checkpointing(variant: str, block_size: int | None, impl: str, mode: str) -> None:
    model = _model(variant, impl, block_size)
    loss0, g0 = _grads(model, "none", _tokens())
    loss, g = _grads(model, mode, _tokens())
    assert loss == pytest.approx(loss0, rel=1e-12)
    assert ((g - g0).norm() / g0.norm()).item() <= 1e-12


@pytest.mark.parametrize("variant", [v for v in variant_names() if v not in ("prenorm", "block", "full")])
def test_every_variant_checkpoints_by_blocks(variant: str) -> None:
    model = _model(variant)
    _, g0 = _grads(model, "none", _tokens())
    _, g = _grads(model, "block", _tokens())
    assert ((g - g0).norm() / g0.norm()).item() <= 1e-12


@pytest.mark.parametrize(
    "variant,group", [("prenorm", 2), ("block", 3), ("full", 1), ("hierarchical", 3), ("mhc", 2)]
)
def test_the_backward_recomputes_each_sublayer_once(variant: str, group: int) -> None:
    """Every sublayer forward runs once more in the backward; ``block`` groups as documented."""
    model = _model(variant)
    assert model.residual.checkpoint_group() == group
    calls: list[int] = []
    for i, sub in enumerate(model.sublayers):
        sub.register_forward_pre_hook(lambda m, a, i=i: calls.append(i))
    for mode in ("none", "sublayer", "block"):
        calls.clear()
        model.set_activation_checkpointing(mode)
        loss = lm_loss(model(_tokens()[:, :-1]), _tokens()[:, 1:])
        assert calls == list(range(6))
        loss.backward()
        assert sorted(calls) == sorted([*range(6)] * (1 if mode == "none" else 2)), mode


@pytest.mark.parametrize("variant", ["prenorm", "block", "full"])
def test_checkpointing_keeps_less_for_the_backward(variant: str) -> None:
    model = _model(variant, block_size=2, n_layers=4).float()
    tokens = torch.randint(0, 61, (2, 9))
    kept = {}
    for mode in ("none", "sublayer", "block"):
        model.set_activation_checkpointing(mode)
        kept[mode] = step_memory(model, tokens, tokens).kept
    assert kept["block"] < kept["sublayer"] < kept["none"] / 2, kept


def test_inference_and_cached_forwards_do_not_checkpoint() -> None:
    model = _model("block", "two_phase")
    model.set_activation_checkpointing("block")
    x = _tokens()[:, :-1]
    with torch.no_grad():
        plain = model(x)
        cache = KVCache(model.cfg, batch=2, dtype=torch.float64)
        cached = model(x, cache=cache)
    model.set_activation_checkpointing("none")
    with torch.no_grad():
        torch.testing.assert_close(plain, model(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cached, plain, rtol=1e-10, atol=1e-10)


def test_unknown_mode_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="none, sublayer, block"):
        _model("prenorm").set_activation_checkpointing("layer")


def test_diagnostics_switch_recomputation_off_while_they_record() -> None:
    """Their hooks would see recomputed sublayers twice; the model's mode is restored after."""
    from attnres.analysis.diagnostics import collect_diagnostics

    model = _model("block").float()
    x = _tokens()
    plain = collect_diagnostics(model, x[:, :-1], x[:, 1:])
    model.set_activation_checkpointing("block")
    checkpointed = collect_diagnostics(model, x[:, :-1], x[:, 1:])
    assert model.activation_checkpointing == "block"
    assert checkpointed == plain
