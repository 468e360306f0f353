"""transformers' activation/gradient checkpointing switches map onto the model's own mechanism."""

from __future__ import annotations

import dataclasses
import functools
import warnings

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

from attnres.hf import AttnResConfig, AttnResForCausalLM  # noqa: E402
from attnres.residuals import ResidualConfig  # noqa: E402


def _model(variant: str) -> AttnResForCausalLM:
    torch.manual_seed(0)
    cfg = AttnResConfig(
        vocab_size=99,
        d_model=32,
        n_layers=2,
        n_heads=4,
        seq_len=16,
        residual=dataclasses.asdict(ResidualConfig.for_variant(variant, block_size=3)),
    )
    model = AttnResForCausalLM(cfg).double().train()
    residual = model.transformer.residual
    if hasattr(residual, "query"):
        with torch.no_grad():
            residual.query.normal_(std=0.5)
    return model


def _grads(model: AttnResForCausalLM) -> torch.Tensor:
    x = torch.randint(0, 99, (2, 12), generator=torch.Generator().manual_seed(1))
    model.zero_grad(set_to_none=True)
    model(input_ids=x, labels=x).loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("variant", ["prenorm", "block", "full"])
def test_gradient_checkpointing_gives_the_same_gradients(variant: str) -> None:
    model = _model(variant)
    assert model.supports_gradient_checkpointing and not model.is_activation_checkpointing
    plain = _grads(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5 deprecates the gradient_ name
        model.gradient_checkpointing_enable()
    assert model.transformer.activation_checkpointing == "block" and model.is_activation_checkpointing
    checkpointed = _grads(model)
    assert ((checkpointed - plain).norm() / plain.norm()).item() <= 1e-12
    model.activation_checkpointing_disable()
    assert model.transformer.activation_checkpointing == "none" and not model.is_activation_checkpointing
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert model.transformer.activation_checkpointing == "block"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"activation_checkpointing_kwargs": {"use_reentrant": True}},
        {"activation_checkpointing_kwargs": {"use_reentrant": False, "preserve_rng_state": False}},
        {"every_n_layers": 2},
        {"offload": True},
    ],
)
def test_checkpointing_options_the_model_cannot_honour_are_refused(kwargs: dict) -> None:
    model = _model("block")
    with pytest.raises(ValueError, match="use_reentrant=False"):
        model.activation_checkpointing_enable(**kwargs)
    assert model.transformer.activation_checkpointing == "none"


def test_the_plain_checkpoint_function_is_accepted() -> None:
    model = _model("prenorm")
    model._set_gradient_checkpointing(True, functools.partial(checkpoint, use_reentrant=False))
    assert model.is_activation_checkpointing
