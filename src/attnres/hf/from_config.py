"""An AttnRes model of the same shape as a transformers Llama or Qwen config, for training from scratch.

Only the *architecture* carries over: widths, depth, heads, vocabulary, RoPE base, norm epsilon,
tying. Pretrained PreNorm weights do not: under AttnRes with zero-init pseudo-queries every read
is the *average* of its sources where PreNorm feeds their *sum*, so a pretrained Llama's weights
compute a different function in an AttnRes model. Train it from scratch (or fine-tune at length).
"""

from __future__ import annotations

from typing import Any

from attnres.configs import ConfigError
from attnres.model import ModelConfig
from attnres.residuals import ResidualConfig

#: model_type -> features of that family which the reference model does not have (need ``allow_differences``)
SUPPORTED = {
    "llama": (),
    "qwen2": ("bias on the q/k/v projections (the reference attention has no biases)",),
    "qwen3": ("per-head RMSNorm of queries and keys (q_norm/k_norm; the reference model has none)",),
}


def _rope_theta(cfg: Any) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        raise ConfigError(
            f"RoPE scaling {rope_type!r} is not supported (the reference model uses plain RoPE); "
            "set rope_parameters={'rope_type': 'default', 'rope_theta': ...}"
        )
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", None))
    if theta is None:
        raise ConfigError("the config has no rope_theta (rope_parameters['rope_theta'])")
    return float(theta)


def _unsupported_settings(cfg: Any) -> list[str]:
    """Settings that change the computation and that no AttnRes model of ours can reproduce."""
    problems = []
    if getattr(cfg, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={cfg.hidden_act!r} (only 'silu', i.e. SwiGLU, is supported)")
    for key in ("attention_bias", "mlp_bias", "use_sliding_window"):
        if getattr(cfg, key, False):
            problems.append(f"{key}=True (set it to False)")
    if getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "use_sliding_window", True):
        problems.append(f"sliding_window={cfg.sliding_window} (only full causal attention is supported)")
    layer_types = getattr(cfg, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        problems.append(f"layer_types={sorted(set(layer_types))} (only 'full_attention')")
    if getattr(cfg, "attention_dropout", 0.0):
        problems.append(f"attention_dropout={cfg.attention_dropout} (the reference model has no dropout)")
    head_dim = getattr(cfg, "head_dim", None)
    if head_dim is not None and head_dim * cfg.num_attention_heads != cfg.hidden_size:
        problems.append(
            f"head_dim={head_dim} != hidden_size / num_attention_heads = "
            f"{cfg.hidden_size // cfg.num_attention_heads} (the reference model derives head_dim)"
        )
    return problems


def model_config_from_hf(
    hf_config: Any,
    residual: ResidualConfig | None = None,
    allow_differences: bool = False,
) -> ModelConfig:
    """A :class:`ModelConfig` with the shape of a transformers Llama, Qwen2 or Qwen3 config.

    Args:
        hf_config: a transformers config object (no weights are read or downloaded).
        residual: the residual scheme; default Block AttnRes with about 8 blocks.
        allow_differences: for Qwen families, accept the nearest reference model, which lacks their
            q/k/v biases (Qwen2) or q/k norms (Qwen3). Llama needs none.

    Raises:
        ConfigError: an unsupported family (MoE, say) or a setting that would change the computation
            (attention or MLP bias, sliding window, RoPE scaling, another activation …), listed.
    """
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED:
        raise ConfigError(
            f"model_type={model_type!r} is not supported; supported: {', '.join(SUPPORTED)} "
            "(dense decoders with SwiGLU, RMSNorm and RoPE; mixture-of-experts models are not)"
        )
    problems = _unsupported_settings(hf_config)
    if problems:
        raise ConfigError(f"unsupported {model_type} config settings: " + "; ".join(problems))
    differences = SUPPORTED[model_type]
    if differences and not allow_differences:
        raise ConfigError(
            f"a {model_type} model has {'; '.join(differences)}. Pass allow_differences=True to build "
            "the nearest AttnRes model without it, for training from scratch"
        )
    return ModelConfig(
        vocab_size=hf_config.vocab_size,
        d_model=hf_config.hidden_size,
        n_layers=hf_config.num_hidden_layers,
        n_heads=hf_config.num_attention_heads,
        n_kv_heads=getattr(hf_config, "num_key_value_heads", None),
        d_ff=hf_config.intermediate_size,
        seq_len=hf_config.max_position_embeddings,
        rope_theta=_rope_theta(hf_config),
        norm_eps=hf_config.rms_norm_eps,
        tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        init_std=getattr(hf_config, "initializer_range", 0.02),
        residual=residual if residual is not None else ResidualConfig(variant="block"),
    )
