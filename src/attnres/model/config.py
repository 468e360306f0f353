"""The reference decoder-only LM's config, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from attnres.configs import check_numbers
from attnres.residuals import ResidualConfig


@dataclass
class ModelConfig:
    """Shape of the reference LM. ``n_layers`` counts Transformer layers; each has two sublayers
    (attention, MLP), and every AttnRes count (block size, read sites) is in sublayers.

    Attributes:
        vocab_size: number of token ids; inputs must lie in ``[0, vocab_size)``.
        d_model: hidden width ``d``.
        n_layers: Transformer layers ``L_b``; the model has ``L = 2 * n_layers`` sublayers.
        n_heads: query heads.
        n_kv_heads: key/value heads for grouped-query attention (``None``: same as ``n_heads``).
        d_ff: SwiGLU hidden width (``None``: ``8/3 * d_model`` rounded up to a multiple of 32).
        seq_len: maximum context length (RoPE tables are built for it).
        rope_theta: RoPE base.
        norm_eps: epsilon of every RMSNorm.
        tie_embeddings: share the embedding and LM head matrices.
        init_std: std of the normal init of weight matrices (see ``Transformer.init_weights``).
        residual: the residual scheme (``prenorm``, ``block``, ``full`` …) and its options.
    """

    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    d_ff: int | None = None
    seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    init_std: float = 0.02
    residual: ResidualConfig = field(default_factory=ResidualConfig)

    def __post_init__(self) -> None:
        if isinstance(self.residual, dict):
            self.residual = ResidualConfig.from_mapping(self.residual)
        check_numbers(self, "model.")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
                f"pick n_heads from the divisors of d_model, e.g. {_divisors(self.d_model)}"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"head_dim = d_model / n_heads = {self.head_dim} must be even for RoPE; "
                "change d_model or n_heads"
            )
        kv = self.kv_heads
        if kv < 1 or self.n_heads % kv:
            raise ValueError(
                f"model.n_kv_heads={kv} must divide model.n_heads={self.n_heads} (grouped-query attention)"
            )
        if self.d_ff is not None and self.d_ff < 1:
            raise ValueError(f"model.d_ff must be >= 1 or None, got {self.d_ff}")
        for name in ("init_std", "norm_eps", "rope_theta"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be > 0, got {getattr(self, name)}")

    @property
    def n_sublayers(self) -> int:
        """``L``: attention and MLP sublayers, two per Transformer layer."""
        return 2 * self.n_layers

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def ff_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        return 32 * -(-(8 * self.d_model // 3) // 32)


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, min(n, 64) + 1) if n % k == 0]
