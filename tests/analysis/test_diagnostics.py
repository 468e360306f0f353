"""Diagnostics: magnitudes, gradient norms and depth-attention weights observed from outside the model."""

from __future__ import annotations

import math

import torch

from attnres.analysis.diagnostics import collect_diagnostics, read_entropy
from attnres.model import ModelConfig, Transformer, lm_loss


def _model(variant="full", **opts):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=99, d_model=32, n_layers=3, n_heads=2, seq_len=16, residual=dict(variant=variant, **opts)
    )
    return Transformer(cfg)


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 99, (2, 7), generator=g), torch.randint(0, 99, (2, 7), generator=g)


def test_magnitudes_and_grad_norms_match_a_manual_pass():
    model = _model("prenorm")
    x, y = _batch()
    d = collect_diagnostics(model, x, y)
    assert all(p.grad is None for p in model.parameters())  # .grad untouched
    lm_loss(model(x), y).backward()
    h = model.embed(x)
    cos, sin = model.rope_cos[:7], model.rope_sin[:7]
    for i, sub in enumerate(model.sublayers):
        out = sub(h, cos, sin)
        rec = d["sublayers"][i]
        assert rec["kind"] == ("attn" if i % 2 == 0 else "mlp") and rec["layer"] == i // 2
        assert math.isclose(rec["input_rms"], h.pow(2).mean().sqrt().item(), rel_tol=1e-5)
        assert math.isclose(rec["output_rms"], out.pow(2).mean().sqrt().item(), rel_tol=1e-5)
        grad = math.sqrt(sum(p.grad.pow(2).sum().item() for p in sub.parameters()))
        assert math.isclose(rec["grad_norm"], grad, rel_tol=1e-4)
        h = h + out
    assert d["reads"] == []  # prenorm has no depth reads


def test_reads_name_their_sources_and_average_the_weights():
    model = _model("block", block_size=2)
    with torch.no_grad():
        model.residual.query.normal_()
    seen = {}
    model.residual.recorder = lambda site, sources, w: seen.__setitem__(site, w)
    x, y = _batch()
    model(x)
    d = collect_diagnostics(model, x, y)
    assert model.residual.recorder is not None  # the caller's recorder is restored
    assert [r["site"] for r in d["reads"]] == list(range(7))
    assert [r["kind"] for r in d["reads"]] == ["attn", "mlp"] * 3 + ["final"]
    assert d["reads"][3]["sources"] == ["emb", "sum", "s2"]  # b0, b1 = v0 + v1, partial = v2
    assert d["reads"][6]["sources"] == ["emb", "sum", "sum", "sum"]
    for r in d["reads"]:
        torch.testing.assert_close(torch.tensor(r["weights"]), seen[r["site"]].mean((1, 2, 3)))
        assert math.isclose(sum(r["weights"]), 1.0, rel_tol=1e-5)
        assert r["entropy"] <= r["max_entropy"] + 1e-6


def test_full_reads_at_init_are_uniform_with_maximal_entropy():
    d = collect_diagnostics(_model("full"), *_batch())
    final = d["reads"][-1]
    assert final["sources"] == ["emb"] + [f"s{i}" for i in range(6)]
    assert final["weights"] == [1 / 7] * 7 or torch.allclose(
        torch.tensor(final["weights"]), torch.full((7,), 1 / 7)
    )
    assert math.isclose(final["entropy"], math.log(7), rel_tol=1e-6)


def test_read_entropy():
    w = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1, 1)
    assert read_entropy(w) == 0.0
    assert math.isclose(
        read_entropy(torch.full((4, 2, 3, 1), 0.5)), math.log(4), rel_tol=1e-6
    )  # sigmoid: normalised
