"""Per-variant residual options: each variant's config holds exactly its options; configs written in
the old flat layout (every variant's options in one dict) still load, into the same model."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from residual_models import tokens

from attnres.configs import ConfigError, apply_overrides, config_diff, from_dict
from attnres.model import ModelConfig, Transformer
from attnres.residuals import ResidualConfig, options_class, variant_names
from attnres.storage.checkpoint import run_config
from attnres.storage.config import resume_conflicts
from attnres.train import get_preset


def flat(variant: str, **changes) -> dict:
    """A residual section as the flat ``ResidualConfig`` wrote it (``dataclasses.asdict``, 17 keys).

    ``block_size=4`` is what ``attnres compare`` over the ``quick`` preset wrote for every variant."""
    old = {
        "variant": variant, "block_size": 4, "eps": 1e-06, "query": "learned", "normalizer": "softmax",
        "key_norm": True, "heads": None, "query_init": None, "window": 8, "n_streams": 4, "dynamic": True,
        "sinkhorn_iters": 20, "dilation": 1, "period": 1, "granularity": "layer", "gate_bias": -2.0,
        "impl": "auto",
    }  # fmt: skip
    return {**old, **changes}


def _model(residual) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=99, d_model=32, n_layers=3, n_heads=2, seq_len=16, residual=residual)
    model = Transformer(cfg).double()
    with torch.no_grad():  # off the init, where many variants equal PreNorm
        for p in model.residual.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("variant", variant_names())
def test_each_variant_has_exactly_its_options(variant: str) -> None:
    cfg = ResidualConfig(variant=variant)
    assert isinstance(cfg, ResidualConfig) and type(cfg) is options_class(variant)
    names = [f.name for f in dataclasses.fields(cfg)]
    assert names[:2] == ["variant", "impl"] and list(dataclasses.asdict(cfg)) == names
    for other in {f.name for v in variant_names() for f in dataclasses.fields(options_class(v))} - set(names):
        with pytest.raises(ConfigError, match=f"no option residual.{other} .*Valid keys for .*{variant}"):
            ResidualConfig(variant=variant, **{other: None})
    assert ResidualConfig.from_mapping(dataclasses.asdict(cfg)) == cfg  # asdict round trip
    assert from_dict(ResidualConfig, json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg


@pytest.mark.parametrize("variant", variant_names())
def test_an_old_flat_config_loads_into_the_same_model(variant: str) -> None:
    """Same parameter names, same values from the same seed, same forward as the new config."""
    old = flat(variant)
    new = ResidualConfig.for_variant(variant, **{k: v for k, v in old.items() if k != "variant"})
    assert ModelConfig(residual=old).residual == new  # the constructor, and from_dict (files)
    assert from_dict(ModelConfig, {"residual": old}).residual == new
    a, b = _model(old), _model(new)
    assert list(a.state_dict()) == list(b.state_dict())
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    assert torch.equal(a(tokens()), b(tokens()))


def test_old_flat_config_keeps_the_options_its_variant_reads() -> None:
    cfg = ModelConfig(residual=flat("hc", n_streams=2, eps=1e-5, block_size=7, gate_bias=-1.0)).residual
    assert dataclasses.asdict(cfg) == {
        "variant": "hc",
        "impl": "auto",
        "n_streams": 2,
        "dynamic": True,
        "eps": 1e-5,
    }
    old16 = {k: v for k, v in flat("full").items() if k != "impl"}  # before impl existed
    assert ModelConfig(residual=old16).residual == ResidualConfig(variant="full")
    # a partial dict may carry options the variant lacks only at their old defaults
    assert (
        ModelConfig(residual={"variant": "prenorm", "block_size": None, "eps": 1e-6}).residual.variant
        == "prenorm"
    )


BAD = [
    (
        {"variant": "hc", "block_size": 4},
        r"no option residual\.block_size \(an option of block, hierarchical\)",
    ),
    ({"variant": "prenorm", "n_streams": 2, "window": 3}, "written before each variant had its own options"),
    (
        {"variant": "block", "blocksize": 4},
        "unknown config key 'residual.blocksize'; did you mean residual.bl",
    ),
    ({"variant": "mhc-lite"}, "unknown residual variant 'mhc-lite'"),
]


@pytest.mark.parametrize(("residual", "message"), BAD)
def test_a_bad_residual_dict_is_a_clear_error(residual: dict, message: str) -> None:
    for load in (
        lambda: ModelConfig(residual=residual),
        lambda: from_dict(ModelConfig, {"residual": residual}),
    ):
        with pytest.raises(ConfigError, match=message):
            load()


def test_an_old_run_config_resumes_and_loads(tmp_path) -> None:
    """A run directory's config.json in the flat layout: it loads, and the same config resumes it."""
    requested = apply_overrides(get_preset("quick"), {"model.residual.variant": "hc"})
    data = dataclasses.asdict(requested)
    data["model"]["residual"] = flat("hc")
    (tmp_path / "config.json").write_text(json.dumps(data))
    saved = run_config(tmp_path)
    assert saved == requested and resume_conflicts(saved, requested) == []
    other = apply_overrides(requested, {"model.residual.n_streams": "2"})
    assert resume_conflicts(saved, other) == ["model.residual.n_streams"]
    block = apply_overrides(requested, {"model.residual.variant": "block"})
    assert "model.residual.variant" in config_diff(
        saved, block
    ) and "model.residual.block_size" in config_diff(
        saved, block
    )  # keys of one side only count as differences


def test_overrides_switch_the_variant_and_its_keys() -> None:
    base = get_preset("quick")  # Block AttnRes, S = 4
    assert base.model.residual.block_size == 4
    cfg = apply_overrides(base, {"model.residual.variant": "hc", "model.residual.n_streams": "2"})
    assert dataclasses.asdict(cfg.model.residual) == {
        "variant": "hc", "impl": "auto", "n_streams": 2, "dynamic": True, "eps": 1e-6
    }  # fmt: skip
    assert apply_overrides(base, {"model.residual.variant": "hierarchical"}).model.residual.block_size == 4
    with pytest.raises(
        ConfigError, match=r"'block' has no option model\.residual\.n_streams \(an option of hc"
    ):
        apply_overrides(base, {"model.residual.n_streams": "2"})
    old = {f"model.residual.{k}": v for k, v in flat("mhc").items()}  # a --config FILE in the old layout
    assert apply_overrides(base, old).model.residual == ResidualConfig(variant="mhc")


def test_switching_variants_keeps_the_shared_options() -> None:
    block = ResidualConfig(variant="block", block_size=3, eps=1e-5, query="input", impl="reference")
    assert block.with_variant("full") == ResidualConfig(
        variant="full", eps=1e-5, query="input", impl="reference"
    )
    assert block.with_variant("prenorm") == ResidualConfig(variant="prenorm", impl="reference")
    with pytest.raises(ConfigError, match="for_variant"):
        dataclasses.replace(block, variant="hc")
    with pytest.raises(TypeError, match="options by name"):
        ResidualConfig("block", 3)
