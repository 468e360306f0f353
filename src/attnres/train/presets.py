"""Named training presets: plain Python functions returning a :class:`TrainConfig`."""

from __future__ import annotations

from collections.abc import Callable

from attnres.model import ModelConfig
from attnres.residuals import ResidualConfig
from attnres.storage.config import DataConfig, LoopConfig, ScheduleConfig, TrainConfig

PRESETS: dict[str, Callable[[], TrainConfig]] = {}


def preset(fn: Callable[[], TrainConfig]) -> Callable[[], TrainConfig]:
    PRESETS[fn.__name__] = fn
    return fn


def get_preset(name: str) -> TrainConfig:
    """A fresh config for preset ``name``; an unknown name lists the valid ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()


@preset
def quick() -> TrainConfig:
    """Shakespeare, BPE-2k, 0.9M-parameter model, 12 sublayers: ~90 s per variant on 2 CPU cores.

    Block AttnRes uses S = 4 here, i.e. 3 blocks plus the embedding, so that it differs from Full.
    """
    return TrainConfig(
        model=ModelConfig(
            vocab_size=2048,
            d_model=96,
            n_layers=6,
            n_heads=4,
            seq_len=128,
            residual=ResidualConfig(variant="block", block_size=4),
        ),
        data=DataConfig(corpus="shakespeare", tokenizer="bpe", vocab_size=2048),
        schedule=ScheduleConfig(name="cosine", warmup_steps=20),
        train=LoopConfig(steps=300, batch_size=16, eval_every=100, eval_tokens=32768),
    )


@preset
def tiny() -> TrainConfig:
    """A seconds-long smoke run (byte tokens, 2 layers); used by tests and for trying the CLI."""
    return TrainConfig(
        model=ModelConfig(vocab_size=257, d_model=32, n_layers=2, n_heads=2, seq_len=32),
        data=DataConfig(corpus="shakespeare", tokenizer="byte"),
        schedule=ScheduleConfig(warmup_steps=2),
        train=LoopConfig(steps=20, batch_size=4, eval_every=10, eval_tokens=2048, progress=False),
    )


@preset
def small() -> TrainConfig:
    """A longer Shakespeare run (~4.7M parameters, 16 sublayers, Block S = 2): tens of minutes on CPU."""
    return TrainConfig(
        model=ModelConfig(
            vocab_size=4096,
            d_model=256,
            n_layers=8,
            n_heads=8,
            seq_len=256,
            residual=ResidualConfig(variant="block", block_size=2),
        ),
        data=DataConfig(corpus="shakespeare", tokenizer="bpe", vocab_size=4096),
        schedule=ScheduleConfig(name="wsd", warmup_steps=100),
        train=LoopConfig(steps=3000, batch_size=16, eval_every=250, eval_tokens=65536, checkpoint_every=500),
    )
