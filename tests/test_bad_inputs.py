"""Bad input is a clear error naming what is wrong: never a silent wrong answer, never a raw traceback.

One table row per case. To add one, append a ``pytest.param(trigger, exception, match, id=...)``
to :data:`CASES`: ``trigger(tmp_path)`` makes the bad call, and ``match`` is a regex the message
must contain. CLI cases go through :func:`run_cli`, which raises :class:`CliError` with stderr when
the command exits 2 with a one-line ``attnres VERB: error: …`` message (anything else fails).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import math
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from attnres.cli import main as cli
from attnres.dropin import AttnResidual
from attnres.model import ModelConfig, Transformer
from attnres.model.cache import KVCache
from attnres.model.generate import SamplingConfig, generate
from attnres.residuals import ResidualConfig, options_class, variant_names

NAN = float("nan")


class CliError(Exception):
    """``attnres`` exited 2 with a one-line error; the message is its stderr."""


def run_cli(*argv: str) -> None:
    """Run ``attnres *argv`` in-process; raise :class:`CliError` if it fails the way it should."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            cli(list(argv))
        except SystemExit as e:
            message = err.getvalue()
            assert e.code == 2, f"exit code {e.code}, stderr: {message}"
            assert message.count("\n") == 1, f"not a one-line error: {message!r}"
            raise CliError(message) from None


@functools.cache
def tiny_model() -> Transformer:
    """A small Block AttnRes LM (vocab 32, context 16), built once; tests only read it."""
    cfg = ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, seq_len=16)
    cfg.residual = ResidualConfig(variant="block")
    return Transformer(cfg).eval()


def nan_model() -> Transformer:
    """A tiny model whose weights are all NaN (a run that diverged)."""
    model = Transformer(tiny_model().cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(NAN)
    return model


def tiny_checkpoint(tmp_path: Path, nan: bool = False) -> str:
    """A checkpoint as ``attnres train`` writes it (byte tokenizer, no training), NaN weights if ``nan``."""
    from attnres.storage.checkpoint import save_checkpoint
    from attnres.storage.config import DataConfig, TrainConfig
    from attnres.storage.tokenizer import ByteTokenizer

    cfg = ModelConfig(vocab_size=257, d_model=16, n_layers=1, n_heads=2, seq_len=32)
    model = Transformer(cfg)
    if nan:
        with torch.no_grad():
            model.embed.weight[3, 1] = NAN
    out = tmp_path / ("nan-run" if nan else "run")
    save_checkpoint(
        out, model, TrainConfig(model=cfg, data=DataConfig(tokenizer="byte")), ByteTokenizer(), {}
    )
    return str(out)


def sample(tmp_path: Path, *args: str, prompt: str = "ab", nan: bool = False) -> None:
    """``attnres sample`` of three new tokens on a tiny checkpoint, with extra ``args``."""
    ckpt = tiny_checkpoint(tmp_path, nan=nan)
    run_cli("sample", "--ckpt", ckpt, "--prompt", prompt, "--max-new-tokens", "3", *args)


def hf_forward(input_ids: torch.Tensor) -> None:
    """The Hugging Face wrapper's forward on ``input_ids``."""
    pytest.importorskip("transformers")
    from attnres.hf import AttnResConfig, AttnResForCausalLM

    cfg = AttnResConfig.from_model_config(tiny_model().cfg)
    AttnResForCausalLM(cfg).eval()(input_ids=input_ids)


def decode_with_wrong_batch() -> None:
    """Prefill a cache made for batch 2 with a batch of 3."""
    cache = KVCache(tiny_model().cfg, batch=2, capacity=8)
    tiny_model()(torch.ones(3, 2, dtype=torch.long), cache=cache)


def dropin_with_nan_eps() -> None:
    """The drop-in API with ``eps=nan``: it used to return all-NaN output."""
    res = AttnResidual(16, 4, eps=NAN)
    res(torch.randn(1, 3, 16), [lambda h: h] * 4)


Trigger = Callable[[Path], Any]

CASES = [
    # configs: every float finite, refused by name (see also the fields test below)
    pytest.param(
        lambda _: ModelConfig(init_std=NAN),
        ValueError,
        r"model\.init_std must be a finite",
        id="model-init-std-nan",
    ),
    pytest.param(
        lambda _: ModelConfig(rope_theta=math.inf),
        ValueError,
        r"model\.rope_theta must be a finite",
        id="model-rope-theta-inf",
    ),
    pytest.param(
        lambda _: ModelConfig(norm_eps=-1e-6),
        ValueError,
        r"model\.norm_eps must be > 0",
        id="model-norm-eps-negative",
    ),
    pytest.param(
        lambda _: ModelConfig(d_model=64.0),
        TypeError,
        r"model\.d_model must be an integer",
        id="model-d-model-float",
    ),
    pytest.param(
        lambda _: ResidualConfig(variant="block", eps=NAN),
        ValueError,
        r"residual\.eps must be a finite",
        id="residual-eps-nan",
    ),
    pytest.param(
        lambda _: ResidualConfig(variant="highway", gate_bias=-math.inf),
        ValueError,
        r"residual\.gate_bias must be a finite",
        id="residual-gate-bias-inf",
    ),
    pytest.param(
        lambda _: ResidualConfig(variant="block", block_size=2.5),
        TypeError,
        r"residual\.block_size must be an integer",
        id="residual-block-size-float",
    ),
    # the drop-in API
    pytest.param(lambda _: dropin_with_nan_eps(), ValueError, r"eps must be a finite", id="dropin-eps-nan"),
    pytest.param(
        lambda _: AttnResidual(0, 4), ValueError, r"d_model must be >= 1, got 0", id="dropin-d-model-zero"
    ),
    pytest.param(
        lambda _: AttnResidual(16, 2.5),
        TypeError,
        r"n_sublayers must be an integer, got 2\.5",
        id="dropin-n-sublayers-float",
    ),
    pytest.param(
        lambda _: AttnResidual(16, True),
        TypeError,
        r"n_sublayers must be an integer, got True",
        id="dropin-n-sublayers-bool",
    ),
    pytest.param(
        lambda _: AttnResidual(16, 4, block_size=0),
        ValueError,
        r"block_size must be >= 1",
        id="dropin-block-size-zero",
    ),
    # token ids given to the model
    pytest.param(
        lambda _: tiny_model()(torch.zeros(1, 3)),
        TypeError,
        r"token ids must be integers .* got dtype torch\.float32",
        id="forward-float-tokens",
    ),
    pytest.param(
        lambda _: tiny_model()(torch.ones(1, 3, dtype=torch.bool)),
        TypeError,
        r"got dtype torch\.bool",
        id="forward-bool-tokens",
    ),
    pytest.param(
        lambda _: tiny_model()([[1, 2]]),
        TypeError,
        r"tokens must be a \[batch, seq\] tensor",
        id="forward-list-tokens",
    ),
    pytest.param(
        lambda _: tiny_model()(torch.tensor([[1, -1]])),
        ValueError,
        r"must lie in \[0, 32\)",
        id="forward-negative-id",
    ),
    pytest.param(
        lambda _: tiny_model()(torch.tensor([[1, 32]])),
        ValueError,
        r"must lie in \[0, 32\)",
        id="forward-id-past-vocab",
    ),
    pytest.param(
        lambda _: hf_forward(torch.zeros(1, 3)),
        TypeError,
        r"got dtype torch\.float32",
        id="hf-float-input-ids",
    ),
    pytest.param(
        lambda _: decode_with_wrong_batch(),
        ValueError,
        r"batch size 3 .* made for batch size 2",
        id="cache-wrong-batch",
    ),
    # generation
    pytest.param(
        lambda _: generate(tiny_model(), [[1.5, 2]], 2),
        TypeError,
        r"prompt 0's token ids must be integers",
        id="generate-float-ids",
    ),
    pytest.param(
        lambda _: generate(tiny_model(), [[1, 2], "ab"], 2),
        TypeError,
        r"prompt 1 is text",
        id="generate-string-prompt",
    ),
    pytest.param(
        lambda _: generate(tiny_model(), "ab", 2),
        TypeError,
        r"prompts must be a list of token-id lists",
        id="generate-string-prompts",
    ),
    pytest.param(
        lambda _: generate(tiny_model(), [[1, None]], 2),
        TypeError,
        r"prompt 0 must be a sequence of integer token ids",
        id="generate-none-id",
    ),
    pytest.param(
        lambda _: generate(tiny_model(), [[1, 40]], 2),
        ValueError,
        r"prompt 0's token ids must lie in \[0, 32\)",
        id="generate-id-past-vocab",
    ),
    pytest.param(
        lambda _: generate(tiny_model(), [[1]], 2.5),
        TypeError,
        r"max_new_tokens must be an integer",
        id="generate-max-new-float",
    ),
    pytest.param(
        lambda _: generate(nan_model(), [[1]], 2, SamplingConfig(temperature=0)),
        ValueError,
        r"logits hold NaN or inf",
        id="generate-nan-logits-greedy",
    ),
    pytest.param(
        lambda _: SamplingConfig(seed=2**70),
        ValueError,
        r"seed must lie in \[0, 2\*\*64\)",
        id="sampling-seed-past-64-bits",
    ),
    pytest.param(
        lambda _: SamplingConfig(temperature=math.inf),
        ValueError,
        r"temperature must be a finite",
        id="sampling-temperature-inf",
    ),
    # attnres sample
    pytest.param(
        lambda p: sample(p, prompt="\udcff"),
        CliError,
        r"attnres sample: error: the prompt is not valid UTF-8 text \(byte 0xff",
        id="sample-invalid-utf8-prompt",
    ),
    pytest.param(
        lambda p: sample(p, "--seed", str(2**70)),
        CliError,
        r"attnres sample: error: seed must lie in",
        id="sample-seed-past-64-bits",
    ),
    pytest.param(
        lambda p: sample(p, nan=True),
        CliError,
        r"nan-run' holds NaN/inf weights \(embed\.weight\)",
        id="sample-nan-weights",
    ),
    pytest.param(
        lambda p: sample(p, "--temperature", "0", nan=True),
        CliError,
        r"holds NaN/inf weights",
        id="sample-nan-weights-greedy",
    ),
]


@pytest.mark.parametrize(("trigger", "exc", "match"), CASES)
def test_bad_input_is_a_clear_error(
    trigger: Trigger, exc: type[Exception], match: str, tmp_path: Path
) -> None:
    with pytest.raises(exc, match=match):
        trigger(tmp_path)


def _section(cls: type) -> str:
    return "model" if cls is ModelConfig else "residual"


def _is_float(tp: Any) -> bool:
    """``float`` or an optional ``float | None``."""
    return tp is float or float in typing.get_args(tp)


FLOAT_FIELDS = [
    pytest.param(cls, f.name, id=f"{_section(cls)}.{f.name}")
    for cls in (ModelConfig, *dict.fromkeys(options_class(v) for v in variant_names()))
    for f in dataclasses.fields(cls)
    if _is_float(typing.get_type_hints(cls)[f.name])
]


@pytest.mark.parametrize("bad", [NAN, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize(("cls", "name"), FLOAT_FIELDS)
def test_every_float_config_field_refuses_non_finite_values_by_name(cls: type, name: str, bad: float) -> None:
    with pytest.raises(ValueError, match=rf"{_section(cls)}\.{name} must be a finite number, got {bad}"):
        cls(**{name: bad})


def test_the_float_field_list_is_not_empty() -> None:
    """The fields test finds the float fields itself; make sure it still finds the known ones."""
    found = {p.id for p in FLOAT_FIELDS}
    assert {"model.init_std", "model.rope_theta", "model.norm_eps", "residual.eps"} <= found
