"""Every residual variant in the model: gradients, PreNorm-at-init, config errors, source schedules."""

from __future__ import annotations

import pytest
import torch
from residual_models import small_model, tokens

from attnres.configs import ConfigError, apply_overrides
from attnres.model import ModelConfig, lm_loss
from attnres.residuals import ResidualConfig, variant_names

#: the variants this package ships; the tests below run over every registered one (variant_names())
BUILT_IN = ["block", "denseformer", "full", "hc", "hierarchical", "highway"]
BUILT_IN += ["mhc", "mhc_lite", "prenorm", "rezero", "swa"]

ABLATIONS = [
    ("block", {"query": "input"}),
    ("block", {"query": "none"}),
    ("block", {"normalizer": "sigmoid"}),
    ("block", {"key_norm": False}),
    ("block", {"heads": 4, "block_size": 3}),
    ("full", {"query": "input", "key_norm": False}),
    ("full", {"query": "none", "normalizer": "sigmoid"}),
    ("swa", {"window": 2}),
    ("hierarchical", {"query": "input", "block_size": 4}),
    ("hierarchical", {"query_init": "zero", "heads": 1}),
    ("hc", {"dynamic": False}),
    ("mhc", {"n_streams": 3}),
    ("mhc_lite", {"dynamic": False}),
    ("denseformer", {"dilation": 2, "period": 2}),
    ("denseformer", {"granularity": "sublayer"}),
    ("highway", {"gate_bias": -1.0}),
]


def test_registry_lists_every_variant():
    assert set(BUILT_IN) <= set(variant_names()) and variant_names() == sorted(variant_names())


@pytest.mark.parametrize(
    ("variant", "opts"), [(v, {}) for v in variant_names()] + ABLATIONS, ids=lambda x: str(x).replace(" ", "")
)
def test_forward_backward_every_parameter_gets_a_gradient(variant, opts):
    model = small_model(variant, d=32, dtype=torch.float32, **opts)
    # move every scheme parameter off its (often zero or symmetric) init, so that a parameter whose
    # gradient is zero only at init is not mistaken for a disconnected one, and vice versa
    with torch.no_grad():
        for p in model.residual.parameters():
            p.add_(0.1 * torch.randn_like(p))
    t = tokens()
    logits = model(t)
    assert logits.shape == (2, 7, 99) and torch.isfinite(logits).all()
    lm_loss(logits, t).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{variant} {opts}: no gradient reaches {name}"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{variant} {opts}: zero gradient for {name}"


@pytest.mark.parametrize(
    ("variant", "opts"),
    [
        ("hc", {}),
        ("hc", {"dynamic": False, "n_streams": 3}),
        ("mhc", {}),
        ("mhc_lite", {}),
        ("mhc_lite", {"n_streams": 3}),
        ("denseformer", {}),
        ("denseformer", {"dilation": 2, "period": 3}),
        ("denseformer", {"granularity": "sublayer", "dilation": 3}),
    ],
    ids=str,
)
@pytest.mark.parametrize("d", [32, 100])
def test_equals_prenorm_at_init(variant, opts, d):
    base = small_model("prenorm", d=d, n_layers=4)
    model = small_model(variant, d=d, n_layers=4, **opts)
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("residual.") for k in missing)
    t = tokens()
    ref = base(t)
    out = model(t)
    # hc and denseformer are exact; mhc/mhc_lite compute coefficients in fp32 (rows sum to 1 to fp32 eps)
    tol = 1e-12 if variant in ("hc", "denseformer") else 1e-6
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


def test_not_prenorm_after_the_scheme_moves():
    """The PreNorm-at-init test can fail: a perturbed DenseFormer differs from PreNorm."""
    base = small_model("prenorm")
    model = small_model("denseformer")
    model.load_state_dict(base.state_dict(), strict=False)
    with torch.no_grad():
        model.residual.dwa[0][0] = 0.5
    assert not torch.allclose(model(tokens()), base(tokens()))


def _record_sources(model, t):
    """Run ``model`` and return (embedding, sublayer outputs, {site: sources}) by tensor identity."""
    outs, reads, emb = [], {}, []
    model.embed.register_forward_hook(lambda m, a, o: emb.append(o))
    for sub in model.sublayers:
        sub.register_forward_hook(lambda m, a, o: outs.append(o))
    model.residual.recorder = lambda site, sources, weights: reads.__setitem__(site, list(sources))
    model(t)
    return emb[0], outs, reads


@pytest.mark.parametrize(("window", "n_layers"), [(8, 6), (3, 4), (1, 2)])
def test_swa_reads_embedding_plus_last_window(window, n_layers):
    model = small_model("swa", n_layers=n_layers, window=window)
    emb, outs, reads = _record_sources(model, tokens())
    L = 2 * n_layers
    assert sorted(reads) == list(range(L + 1))
    for site in range(L + 1):
        expected = [emb, *outs[max(0, site - window) : site]]
        got = reads[site]
        assert len(got) == len(expected) and all(a is b for a, b in zip(got, expected, strict=True)), (
            f"site {site}"
        )


def test_block_reads_sums_and_partial():
    """Block S=2, L=6: site 3 reads [b0=emb, b1=v0+v1, partial=v2]."""
    model = small_model("block", block_size=2)
    emb, outs, reads = _record_sources(model, tokens())
    got = reads[3]
    assert got[0] is emb and got[2] is outs[2]
    torch.testing.assert_close(got[1], outs[0] + outs[1])


def test_hierarchical_groups_individual_outputs():
    model = small_model("hierarchical", block_size=2)
    emb, outs, reads = _record_sources(model, tokens())
    assert [len(reads[s]) for s in range(7)] == [1, 2, 3, 4, 5, 6, 7]
    assert all(a is b for a, b in zip(reads[6], [emb, *outs], strict=True))


def test_hierarchical_zero_init_is_uniform_within_and_across_groups():
    model = small_model("hierarchical", block_size=2, query_init="zero")
    seen = {}
    model.residual.recorder = lambda site, sources, w: seen.__setitem__(site, w)
    model(tokens())
    # final read of L=6, S=2: groups [emb], [v0,v1], [v2,v3], [v4,v5] -> 1/4 and 1/8 each
    expected = torch.tensor([1 / 4] + [1 / 8] * 6, dtype=torch.float32)
    torch.testing.assert_close(seen[6][:, 0, 0, 0], expected.to(seen[6].dtype))  # fp64 model: fp64 weights


def test_denseformer_matches_the_dwa_formula():
    """Scheme-level: k=2, p=2 over 4 units: Y_2 = a·X_0 + b·X_2, Y_4 = c·X_0 + e·X_2 + f·X_4."""
    from attnres.residuals import build_residual

    scheme = build_residual(ResidualConfig("denseformer", dilation=2, period=2), 5, 8).double()
    assert [a.numel() for a in scheme.dwa] == [2, 3]
    with torch.no_grad():
        scheme.dwa[0].copy_(torch.tensor([0.3, -0.7]))
        scheme.dwa[1].copy_(torch.tensor([2.0, 0.5, 1.5]))
    x0 = torch.randn(5, dtype=torch.float64)
    deltas = torch.randn(8, 5, dtype=torch.float64)
    state = scheme.init_state(x0)
    for layer in range(8):
        assert torch.equal(scheme.layer_input(state, layer), state.h)
        state = scheme.update(state, layer, deltas[layer])
    X1 = x0 + deltas[0] + deltas[1]
    X2 = X1 + deltas[2] + deltas[3]
    Y2 = 0.3 * x0 - 0.7 * X2
    X3 = Y2 + deltas[4] + deltas[5]
    X4 = X3 + deltas[6] + deltas[7]
    torch.testing.assert_close(scheme.final(state), 2.0 * x0 + 0.5 * X2 + 1.5 * X4)


def test_rezero_has_no_sublayer_norm_and_starts_as_identity():
    model = small_model("rezero")
    assert all(isinstance(s.norm, torch.nn.Identity) for s in model.sublayers)
    t = tokens()
    torch.testing.assert_close(model.hidden(t), model.embed(t))


def test_highway_gate_starts_at_sigmoid_bias():
    model = small_model("highway", gate_bias=-3.0)
    g = model.residual.gate(torch.randn(2, 7, 32, dtype=torch.float64), 0)
    torch.testing.assert_close(g, torch.full_like(g, torch.sigmoid(torch.tensor(-3.0)).item()))


def test_unknown_variant_lists_valid_ones():
    with pytest.raises(ValueError, match="valid variants: .*mhc_lite.*prenorm"):
        ResidualConfig(variant="mhc-lite")


@pytest.mark.parametrize(
    ("variant", "opts", "listed"),
    [
        ("block", {"query": "dynamic"}, "learned, input, none"),
        ("block", {"normalizer": "relu"}, "softmax, sigmoid"),
        ("denseformer", {"granularity": "block"}, "layer, sublayer"),
        ("block", {"query_init": "ones"}, "zero, normal"),
    ],
)
def test_unknown_option_value_lists_valid_ones(variant, opts, listed):
    with pytest.raises(ValueError, match=listed):
        ResidualConfig(variant=variant, **opts)


def test_unknown_option_key_lists_valid_ones_and_dotted_overrides_work():
    cfg = apply_overrides(ModelConfig(), {"residual.variant": "swa", "residual.window": "4"})
    assert cfg.residual.window == 4
    with pytest.raises(ConfigError, match="residual.window"):
        apply_overrides(ModelConfig(), {"residual.windw": "4"})


@pytest.mark.parametrize(
    ("variant", "opts", "message"),
    [
        ("block", {"query_init": "normal"}, "must start at zero"),
        ("block", {"heads": 3}, "must divide d_model"),
        ("block", {"query": "none", "heads": 2}, "needs a query"),
        ("hierarchical", {"query": "none"}, "learned or input"),
        ("mhc_lite", {"n_streams": 6}, "at most 5"),
        ("swa", {"window": 0}, "window must be >= 1"),
    ],
)
def test_bad_variant_options_are_clear_errors(variant, opts, message):
    with pytest.raises(ValueError, match=message):
        small_model(variant, **opts)


@pytest.mark.parametrize("variant", variant_names())
def test_same_seed_gives_every_variant_the_same_sublayer_and_embedding_init(variant):
    """Fair comparisons: under one seed only the residual scheme differs between variants."""
    base = dict(small_model("prenorm", seed=7).named_parameters())
    for name, p in small_model(variant, seed=7).named_parameters():
        if not name.startswith("residual."):
            assert torch.equal(p, base[name]), name
