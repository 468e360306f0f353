"""The reference LM: PreNorm equivalence, init, and clear errors for bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnres.model import ModelConfig, Transformer
from attnres.ops.reference import depth_weights
from attnres.residuals import ResidualConfig


def small(variant: str = "prenorm", **kw) -> ModelConfig:
    return ModelConfig(
        vocab_size=99,
        d_model=32,
        n_layers=3,
        n_heads=4,
        n_kv_heads=2,
        seq_len=16,
        residual=ResidualConfig(variant, **kw),
    )


def test_prenorm_equals_plain_residual_loop_bit_for_bit() -> None:
    model = Transformer(small("prenorm"))
    tokens = torch.randint(0, 99, (2, 11))
    x = model.embed(tokens)
    cos, sin = model.rope_cos[:11], model.rope_sin[:11]
    for f in model.sublayers:
        x = x + f(x, cos, sin)  # each f applies its own pre-norm: x + f(norm(x))
    expected = model.lm_head(model.norm(x))
    assert torch.equal(model(tokens), expected)


@pytest.mark.parametrize("variant", ["block", "full"])
def test_attnres_init_zero_queries_and_unit_gains(variant: str) -> None:
    model = Transformer(small(variant))
    assert torch.count_nonzero(model.residual.query) == 0
    assert torch.equal(model.residual.key_gain, torch.ones_like(model.residual.key_gain))
    assert model.residual.query.shape == (2 * 3 + 1, 32)


def test_attnres_first_forward_reads_uniform_averages() -> None:
    model = Transformer(small("full"))
    sources = [torch.randn(2, 5, 32) for _ in range(4)]
    w = depth_weights(sources, model.residual.query[3], model.residual.key_gain[3])
    torch.testing.assert_close(w, torch.full_like(w, 0.25))


@pytest.mark.parametrize("variant", ["prenorm", "block", "full"])
def test_forward_backward_all_params_get_gradients(variant: str) -> None:
    model = Transformer(small(variant, **({"block_size": 2} if variant == "block" else {})))
    tokens = torch.randint(0, 99, (2, 7))
    logits = model(tokens)
    assert logits.shape == (2, 7, 99)
    F.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name


def test_attnres_queries_learn_after_one_step() -> None:
    model = Transformer(small("block", block_size=2))
    tokens = torch.randint(0, 99, (2, 7))
    F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten()).backward()
    # Read sites with >= 2 sources get a non-zero query gradient; site 0 sees only the embedding.
    grad = model.residual.query.grad
    assert torch.count_nonzero(grad[0]) == 0
    assert all(torch.count_nonzero(grad[site]) > 0 for site in range(1, grad.shape[0]))


def test_tied_embeddings_share_storage() -> None:
    model = Transformer(ModelConfig(d_model=32, n_heads=2, tie_embeddings=True))
    assert model.lm_head.weight is model.embed.weight


def test_token_id_out_of_vocab_is_a_clear_error() -> None:
    model = Transformer(small())
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 99\)"):
        model(torch.tensor([[1, 2, 99]]))
    with pytest.raises(ValueError, match="token ids"):
        model(torch.tensor([[-1, 2]]))


def test_too_long_or_empty_sequences_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="exceeds model.seq_len=16"):
        Transformer(small())(torch.zeros(1, 17, dtype=torch.long))
    for shape in ((1, 0), (0, 5)):
        with pytest.raises(ValueError, match="at least one sequence of one token"):
            Transformer(small())(torch.zeros(shape, dtype=torch.long))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"d_model": 30, "n_heads": 4}, "not divisible by model.n_heads"),
        ({"d_model": 32, "n_heads": 4, "n_kv_heads": 3}, "must divide model.n_heads"),
        ({"d_model": 30, "n_heads": 2}, "must be even for RoPE"),
        ({"n_layers": 0}, "n_layers must be >= 1"),
    ],
)
def test_bad_model_config_names_the_fix(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


@pytest.mark.parametrize("block_size", [0, -3])
def test_block_size_below_one_is_refused(block_size: int) -> None:
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        ResidualConfig("block", block_size=block_size)


def test_unknown_variant_lists_valid_ones() -> None:
    with pytest.raises(
        ValueError, match=r"unknown residual variant 'attn'; valid variants: .*block.*full.*prenorm"
    ):
        ResidualConfig("attn")
