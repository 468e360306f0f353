"""The drop-in API (``attnres.AttnResidual``) and the README before/after snippet, run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import attnres
from attnres.dropin import AttnResidual
from attnres.model import ModelConfig, Transformer
from attnres.residuals import ResidualConfig, variant_names

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_snippet(marker: str) -> str:
    """The python block right after ``<!-- dropin:<marker> -->`` in the README."""
    match = re.search(rf"<!-- dropin:{marker} -->\s*```python\n(.*?)```", README.read_text(), re.S)
    assert match, f"README has no python block after <!-- dropin:{marker} -->"
    return match.group(1)


@pytest.fixture(scope="module")
def snippets() -> dict:
    ns: dict = {}
    exec(compile(readme_snippet("before"), "README:before", "exec"), ns)
    exec(compile(readme_snippet("after"), "README:after", "exec"), ns)
    return ns


def test_readme_after_with_prenorm_is_the_before_model(snippets: dict) -> None:
    torch.manual_seed(0)
    before = snippets["MyLM"](d=32, n_layers=3).eval()
    after = snippets["MyAttnResLM"](d=32, n_layers=3, variant="prenorm").eval()
    after.load_state_dict(before.state_dict())  # strict: prenorm adds no parameters
    x = torch.randint(0, 99, (2, 7))
    assert torch.equal(after(x), before(x))


@pytest.mark.parametrize("variant", ["block", "full"])
def test_readme_after_runs_attnres_and_trains_the_queries(snippets: dict, variant: str) -> None:
    torch.manual_seed(0)
    model = snippets["MyAttnResLM"](d=32, n_layers=3, variant=variant)
    x = torch.randint(0, 99, (2, 7))
    logits = model(x)
    assert logits.shape == (2, 7, 99) and torch.isfinite(logits).all()
    logits.logsumexp(-1).mean().backward()
    assert model.res.scheme.query.grad.abs().sum() > 0
    n_extra = sum(p.numel() for p in model.res.parameters())
    assert n_extra == 2 * 32 * (2 * 3 + 1)


def _list_of_sublayers(model: Transformer) -> list:
    cos, sin = model.rope_cos[:7], model.rope_sin[:7]
    return [lambda h, f=f: f(h, cos, sin) for f in model.sublayers]


@pytest.mark.parametrize("variant", variant_names())
def test_facade_matches_the_reference_model(variant: str) -> None:
    """The facade drives a scheme exactly as ``Transformer.hidden`` does, for every variant."""
    cfg = ModelConfig(
        vocab_size=99,
        d_model=32,
        n_layers=3,
        n_heads=4,
        residual=ResidualConfig.for_variant(variant, block_size=2),
    )
    torch.manual_seed(0)
    model = Transformer(cfg)
    res = AttnResidual(32, n_sublayers=6, variant=variant, block_size=2)
    res.load_state_dict({f"scheme.{k}": v for k, v in model.residual.state_dict().items()})
    for p in res.parameters():
        with torch.no_grad():
            p.add_(torch.randn_like(p))
    model.residual.load_state_dict(res.scheme.state_dict())
    x = torch.randint(0, 99, (2, 7))
    assert torch.equal(res(model.embed(x), _list_of_sublayers(model)), model.hidden(x))


def test_zero_init_is_uniform_average() -> None:
    res = AttnResidual(8, n_sublayers=2, variant="full")
    torch.nn.init.normal_(res.scheme.query)
    res.reset_parameters()
    e, a, m = torch.randn(3, 1, 2, 8).unbind(0)
    s = res.start(e)
    assert torch.equal(s.x, e)  # one source: identity
    s.add(a)
    torch.testing.assert_close(s.x, (e + a) / 2)
    s.add(m)
    torch.testing.assert_close(s.output(), (e + a + m) / 3)


def test_wrong_number_of_sublayers_is_a_clear_error() -> None:
    res = AttnResidual(8, n_sublayers=2)
    s = res.start(torch.zeros(1, 1, 8))
    s.add(torch.ones(1, 1, 8))
    with pytest.raises(RuntimeError, match="n_sublayers=2"):
        s.output()
    s.add(torch.ones(1, 1, 8))
    with pytest.raises(RuntimeError, match="already added"):
        s.add(torch.ones(1, 1, 8))
    with pytest.raises(ValueError, match="unknown residual variant"):
        AttnResidual(8, 2, variant="blok")


def test_top_level_export() -> None:
    assert attnres.AttnResidual is AttnResidual
    with pytest.raises(AttributeError):
        _ = attnres.NoSuchThing
