"""``AttnResConfig``: the transformers config of our model, generated from :class:`ModelConfig`.

The architecture fields are not listed here. They are read from the ``ModelConfig`` dataclass (the
nested ``residual`` section included), validated by building a ``ModelConfig``, and stored under
the same names, so a field added to ``ModelConfig`` appears here with no edit. The standard
transformers names (``hidden_size``, ``num_hidden_layers`` …) are aliases of ours.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import GenerationConfig, PretrainedConfig

from attnres.configs import ConfigError, from_dict
from attnres.model import ModelConfig

#: transformers' conventional attribute names -> our ModelConfig field names
HF_ALIASES = {
    "hidden_size": "d_model",
    "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads",
    "num_key_value_heads": "n_kv_heads",
    "intermediate_size": "d_ff",
    "max_position_embeddings": "seq_len",
    "rms_norm_eps": "norm_eps",
    "tie_word_embeddings": "tie_embeddings",
    "initializer_range": "init_std",
}

#: settings that belong to transformers (generation, tokens), not to the architecture
_HF_FIELDS = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None, "use_cache": True}

#: keys transformers itself passes to (or writes from) every config; anything else is rejected
_BASE_KEYS = (
    {f.name for f in dataclasses.fields(PretrainedConfig)}
    | set(GenerationConfig._get_default_generation_params())
    | {
        "model_type",
        "auto_map",  # written by save_pretrained, for trust_remote_code loading (attnres.hf.remote_code)
        "torch_dtype",
        "num_labels",
        "name_or_path",
        "output_attentions",
        "attn_implementation",
        "experts_implementation",
        "per_layer_config",
    }
)


def _model_defaults() -> dict[str, Any]:
    return dataclasses.asdict(ModelConfig())


class AttnResConfig(PretrainedConfig):
    """transformers config for :class:`attnres.hf.AttnResForCausalLM` (``model_type="attnres"``).

    Keyword arguments are the fields of :class:`attnres.model.ModelConfig` (``residual`` as a dict
    of the variant's :class:`attnres.residuals.ResidualConfig` fields: ``variant``, ``impl`` and its
    options), their transformers aliases in
    ``HF_ALIASES``, the token ids, ``use_cache``, and the generic transformers keys. Any other key is
    an error: a model we cannot build faithfully must not load silently.

    Example::

        AttnResConfig(vocab_size=99, d_model=64, n_layers=2, residual={"variant": "block"})
        AttnResConfig.from_model_config(model_cfg)
    """

    model_type = "attnres"
    attribute_map = HF_ALIASES
    keys_to_ignore_at_inference = ["past_key_values", "cache"]  # the cache output, under both of its names

    def __init__(self, **kwargs: Any) -> None:
        other = kwargs.pop("model_type", self.model_type)
        if other != self.model_type:
            raise ConfigError(
                f"this is a {other!r} config, not an AttnRes ({self.model_type!r}) one. A pretrained "
                f"{other} checkpoint cannot be loaded as AttnRes (PreNorm weights are not function-"
                "preserving under AttnRes); to train an AttnRes model of the same shape from scratch use "
                "attnres.hf.model_config_from_hf(config)"
            )
        for alias, name in HF_ALIASES.items():
            if alias in kwargs:
                if name in kwargs and kwargs[name] != kwargs[alias]:
                    raise ConfigError(f"both {alias}={kwargs[alias]!r} and {name}={kwargs[name]!r} given")
                kwargs[name] = kwargs.pop(alias)
        arch = _model_defaults()
        residual = {**arch["residual"], **(kwargs.pop("residual", None) or {})}
        arch = {name: kwargs.pop(name, default) for name, default in arch.items()}
        arch["residual"] = residual
        unknown = sorted(k for k in kwargs if k not in _BASE_KEYS and k not in _HF_FIELDS and k[0] != "_")
        if unknown:
            raise ConfigError(
                f"unsupported AttnResConfig key(s): {', '.join(unknown)}. The reference model has no such "
                f"option; valid architecture keys: {', '.join(arch)} (aliases: {', '.join(HF_ALIASES)})"
            )
        built = from_dict(ModelConfig, arch)  # validates every value, with messages that name the fix
        # the variant's options only (a residual dict in the old flat layout is migrated)
        arch["residual"] = dataclasses.asdict(built.residual)
        for name, value in arch.items():
            setattr(self, name, value)
        for name, default in _HF_FIELDS.items():
            setattr(self, name, kwargs.pop(name, default))
        super().__init__(**kwargs)

    def to_model_config(self) -> ModelConfig:
        """The :class:`ModelConfig` this config describes."""
        return from_dict(ModelConfig, {name: getattr(self, name) for name in _model_defaults()})

    @classmethod
    def from_model_config(cls, cfg: ModelConfig, **kwargs: Any) -> AttnResConfig:
        """Wrap ``cfg``; ``kwargs`` set the transformers-side fields (token ids, ``use_cache`` …)."""
        return cls(**dataclasses.asdict(cfg), **kwargs)
