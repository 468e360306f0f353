"""mHC's Sinkhorn and mHC-lite's permutation mix: doubly stochastic to the stated precision."""

from __future__ import annotations

import pytest
import torch
from residual_models import small_model

from attnres.residuals.hyper import permutation_matrices, sinkhorn


def _errors(m):
    return (m.sum(-1) - 1).abs().max().item(), (m.sum(-2) - 1).abs().max().item()


def test_sinkhorn_20_iterations_is_doubly_stochastic_within_1e_3():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4096, 4, 4, generator=g)
    assert min(_errors(logits.exp())) > 0.1  # the input is far from doubly stochastic
    m = sinkhorn(logits, 20)
    assert m.dtype == torch.float32 and (m >= 0).all()
    rows, cols = _errors(m)
    assert rows < 1e-5 and cols < 1e-3, (rows, cols)
    assert max(_errors(sinkhorn(logits, 1))) > 1e-3  # one iteration is not enough: the test can fail


def test_sinkhorn_converges_slowly_for_a_wide_dynamic_range():
    """The known limitation (mHC-lite paper): with logits spanning ~±16, 20 iterations leave
    column errors far above 1e-3. mhc_lite has no such error by construction."""
    g = torch.Generator().manual_seed(0)
    _, cols = _errors(sinkhorn(8.0 * torch.randn(4096, 4, 4, generator=g), 20))
    assert cols > 1e-2


def test_sinkhorn_stays_finite_when_a_column_underflows():
    """A column ~120 below the rest is exp-underflow zeros: finite rows summing to 1, no 0/0 NaN."""
    logits = torch.zeros(4, 4, requires_grad=True)
    shifted = logits + torch.tensor([0.0, 0.0, 0.0, -120.0])  # column 3
    m = sinkhorn(shifted, 20)
    assert torch.isfinite(m).all() and (m[:, 3] == 0).all()
    torch.testing.assert_close(m.sum(-1), torch.ones(4))
    m.sum().backward()
    assert torch.isfinite(logits.grad).all()
    g = torch.Generator().manual_seed(1)
    ordinary = torch.randn(64, 4, 4, generator=g)  # no sum underflows: the guard changes nothing
    reference = torch.exp(ordinary - ordinary.amax(dim=(-2, -1), keepdim=True))
    for _ in range(20):  # the unguarded iteration
        reference = reference / reference.sum(-2, keepdim=True)
        reference = reference / reference.sum(-1, keepdim=True)
    assert torch.equal(sinkhorn(ordinary, 20), reference)


def test_sinkhorn_is_fp32_for_bf16_input():
    assert sinkhorn(torch.zeros(3, 3, dtype=torch.bfloat16), 20).dtype == torch.float32


def _model_mixes(variant, scale=0.03, **opts):
    model = small_model(variant, dtype=torch.float32, **opts)
    with torch.no_grad():
        for p in model.residual.parameters():
            p.add_(scale * torch.randn_like(p))
    state = torch.randn(2, 7, model.residual.n_streams, 32)
    return [model.residual.coefficients(state, layer)[1] for layer in range(model.cfg.n_sublayers)]


def test_mhc_matrices_in_the_model_are_doubly_stochastic():
    """Parameters moved by N(0, 0.03) from the near-identity init. Near-identity matrices are
    Sinkhorn's slow case: measured worst column error after 20 iterations is 3e-5 at 0.01,
    1.3e-4 at 0.03, 1.1e-3 at 0.1 and 2.8e-2 at 0.3 (rows stay exact); mhc_lite has none."""
    for mix in _model_mixes("mhc"):
        rows, cols = _errors(mix)
        assert rows < 1e-5 and cols < 1e-3 and (mix >= 0).all()


@pytest.mark.parametrize("n", [2, 3, 4])
def test_mhc_lite_matrices_are_doubly_stochastic_to_fp32_precision(n):
    for mix in _model_mixes("mhc_lite", scale=0.3, n_streams=n):
        rows, cols = _errors(mix)
        assert rows < 1e-6 and cols < 1e-6 and (mix >= 0).all()


def test_permutation_matrices():
    p = permutation_matrices(4)
    assert p.shape == (24, 4, 4)
    assert torch.equal(p[0], torch.eye(4))
    assert torch.equal(p.sum(-1), torch.ones(24, 4)) and torch.equal(p.sum(-2), torch.ones(24, 4))
    assert len({tuple(x.flatten().tolist()) for x in p}) == 24


def test_hc_init_is_faithful():
    """Static parts: read one-hot on stream l mod m, mix I, write 1; dynamic scales 0.01."""
    r = small_model("hc", n_streams=4).residual
    assert torch.equal(r.static_read[5], torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64))
    assert torch.equal(r.static_mix[3], torch.eye(4, dtype=torch.float64))
    assert (r.static_write == 1).all() and (r.dyn_mix == 0).all()
    torch.testing.assert_close(r.scale_alpha, torch.full_like(r.scale_alpha, 0.01))
