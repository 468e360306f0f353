"""Small model builders shared by the residual-variant tests."""

from __future__ import annotations

import torch

from attnres.model import ModelConfig, Transformer


def small_model(variant: str, d: int = 32, n_layers: int = 3, dtype=torch.float64, seed: int = 0, **opts):
    """A tiny model (odd vocab 99) with residual ``variant`` and options ``opts``."""
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=99,
        d_model=d,
        n_layers=n_layers,
        n_heads=2,
        seq_len=16,
        residual=dict(variant=variant, **opts),
    )
    return Transformer(cfg).to(dtype)


def tokens(B: int = 2, T: int = 7, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 99, (B, T), generator=g)
