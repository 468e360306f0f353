"""The Table 4 ablation switches, as options of the ``block`` / ``full`` scheme, in the model."""

from __future__ import annotations

import pytest
import torch
from residual_models import small_model, tokens

from attnres.residuals import ResidualConfig, build_residual


def _weights(model):
    seen = {}
    model.residual.recorder = lambda site, sources, w: seen.__setitem__(
        site, w.expand(len(sources), 2, 7, -1)
    )
    model(tokens())
    return seen


@pytest.mark.parametrize("variant", ["block", "full", "swa"])
def test_generalised_read_with_one_head_equals_the_paper_read_in_the_model(variant):
    model = small_model(variant, dtype=torch.float32, heads=1)
    with torch.no_grad():
        model.residual.query.normal_()
    ref = model(tokens())
    model.residual._paper_read = False  # force the generalised read with the same parameters
    torch.testing.assert_close(model(tokens()), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("opts", "value"),
    [
        ({}, "uniform"),
        ({"query": "input"}, "uniform"),
        ({"query": "none"}, "uniform"),
        ({"normalizer": "sigmoid"}, 0.5),
    ],
    ids=str,
)
def test_first_forward_weights(opts, value):
    """Zero-initialised queries, projections and mixing logits all start uniform; sigmoid starts at 1/2."""
    for site, w in _weights(small_model("full", **opts)).items():
        expected = 1.0 / w.shape[0] if value == "uniform" else value
        torch.testing.assert_close(w, torch.full_like(w, expected), msg=f"site {site}")


def test_sigmoid_differs_from_softmax_only_in_the_normalisation():
    """Same parameters, same sources: the scores agree; only how they become weights differs."""
    soft = build_residual(ResidualConfig("full"), 32, 6)
    sig = build_residual(ResidualConfig("full", normalizer="sigmoid"), 32, 6)
    with torch.no_grad():
        sig.query.copy_(soft.query.normal_(std=0.2))  # scores of O(1): no sigmoid saturation
    sources = [torch.randn(2, 7, 32) for _ in range(4)]
    seen = []
    for scheme in (soft, sig):
        scheme.recorder = lambda site, src, w: seen.append(w)
        out = scheme.read(sources, 3)
        torch.testing.assert_close(out, (seen[-1] * torch.stack(sources)).sum(0))
    w_soft, w_sig = seen
    torch.testing.assert_close(w_soft, torch.logit(w_sig.double()).softmax(0).float(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(w_soft.sum(0), w_sig.sum(0))  # sigmoid weights do not sum to 1


def test_multi_head_weights_have_one_column_per_head():
    w = _weights(small_model("block", heads=4, block_size=2))
    assert w[6].shape == (4, 2, 7, 4)
