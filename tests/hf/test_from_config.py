"""Building an AttnRes model with the shape of a transformers Llama/Qwen config."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from attnres.configs import ConfigError  # noqa: E402
from attnres.hf import model_config_from_hf  # noqa: E402
from attnres.model import Transformer  # noqa: E402
from attnres.residuals import ResidualConfig  # noqa: E402

SHAPE = dict(vocab_size=99, intermediate_size=100, num_hidden_layers=3, max_position_embeddings=64)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied matrices count once


def read_site_params(d: int, n_layers: int) -> int:
    """Two d-vectors (pseudo-query and key-norm gain) per read site; L + 1 sites, L = 2 * n_layers."""
    return 2 * d * (2 * n_layers + 1)


@pytest.mark.parametrize("variant", ["block", "full"])
@pytest.mark.parametrize(
    "d,heads,kv,tie", [(32, 4, 2, False), (100, 2, 1, True)], ids=["d32-gqa", "d100-tied"]
)
def test_llama_param_count_differs_by_read_site_vectors(
    variant: str, d: int, heads: int, kv: int, tie: bool
) -> None:
    hf = LlamaConfig(
        hidden_size=d, num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tie, **SHAPE
    )
    ours = Transformer(model_config_from_hf(hf, ResidualConfig(variant=variant)))
    assert n_params(ours) - n_params(LlamaForCausalLM(hf)) == read_site_params(d, 3)
    prenorm = Transformer(model_config_from_hf(hf, ResidualConfig(variant="prenorm")))
    assert n_params(prenorm) == n_params(LlamaForCausalLM(hf))


def _llama_weights_into_ours(llama: LlamaForCausalLM, ours: Transformer) -> None:
    names = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo"}
    mlp = {"gate_proj": "w_gate", "up_proj": "w_up", "down_proj": "w_down"}
    sd = {"embed.weight": llama.model.embed_tokens.weight, "norm.weight": llama.model.norm.weight}
    sd["lm_head.weight"] = llama.lm_head.weight
    for i, layer in enumerate(llama.model.layers):
        sd[f"sublayers.{2 * i}.norm.weight"] = layer.input_layernorm.weight
        sd[f"sublayers.{2 * i + 1}.norm.weight"] = layer.post_attention_layernorm.weight
        for theirs, mine in names.items():
            sd[f"sublayers.{2 * i}.{mine}.weight"] = getattr(layer.self_attn, theirs).weight
        for theirs, mine in mlp.items():
            sd[f"sublayers.{2 * i + 1}.{mine}.weight"] = getattr(layer.mlp, theirs).weight
    ours.load_state_dict(sd, strict=False)


def test_same_architecture_prenorm_reproduces_llama_but_attnres_does_not() -> None:
    """The converted shape is the Llama architecture: with the PreNorm scheme, Llama's weights give
    Llama's logits. With AttnRes they do not (zero queries average the sources, PreNorm sums them),
    which is why the docs say pretrained weights are not function-preserving."""
    hf = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, **SHAPE)
    torch.manual_seed(0)
    llama = LlamaForCausalLM(hf).eval()
    x = torch.randint(0, 99, (2, 7))
    with torch.no_grad():
        want = llama(x).logits
        for variant in ("prenorm", "block"):
            ours = Transformer(model_config_from_hf(hf, ResidualConfig(variant=variant))).eval()
            _llama_weights_into_ours(llama, ours)
            got = ours(x)
            if variant == "prenorm":
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            else:
                assert (got - want).abs().max() > 1e-3


def test_qwen_families_need_allow_differences_and_count_them() -> None:
    d, hd, layers = 32, 8, 3
    qwen3 = Qwen3Config(hidden_size=d, num_attention_heads=4, num_key_value_heads=2, head_dim=hd, **SHAPE)
    with pytest.raises(ConfigError, match="allow_differences=True"):
        model_config_from_hf(qwen3)
    ours = Transformer(model_config_from_hf(qwen3, allow_differences=True))
    qk_norm = 2 * hd * layers  # what Qwen3 has and we lack
    assert n_params(ours) - n_params(Qwen3ForCausalLM(qwen3)) == read_site_params(d, layers) - qk_norm

    qwen2 = Qwen2Config(hidden_size=d, num_attention_heads=4, num_key_value_heads=2, **SHAPE)
    ours = Transformer(model_config_from_hf(qwen2, allow_differences=True))
    qkv_bias = (4 + 2 + 2) * hd * layers
    assert n_params(ours) - n_params(Qwen2ForCausalLM(qwen2)) == read_site_params(d, layers) - qkv_bias


@pytest.mark.parametrize(
    "config,match",
    [
        (LlamaConfig(attention_bias=True, **SHAPE), "attention_bias=True"),
        (LlamaConfig(mlp_bias=True, **SHAPE), "mlp_bias=True"),
        (LlamaConfig(hidden_act="gelu", **SHAPE), "hidden_act='gelu'"),
        (LlamaConfig(attention_dropout=0.1, **SHAPE), "attention_dropout"),
        (LlamaConfig(head_dim=64, hidden_size=256, num_attention_heads=8, **SHAPE), "head_dim=64"),
        (
            LlamaConfig(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}, **SHAPE),
            "RoPE scaling 'linear'",
        ),
        (Qwen2Config(use_sliding_window=True, sliding_window=16, max_window_layers=1, **SHAPE), "sliding"),
        (MixtralConfig(), "model_type='mixtral' is not supported"),
    ],
    ids=["attn-bias", "mlp-bias", "gelu", "dropout", "head-dim", "rope-scaling", "sliding-window", "moe"],
)
def test_unsupported_settings_raise(config, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        model_config_from_hf(config, allow_differences=True)


def test_shape_fields_carry_over() -> None:
    hf = LlamaConfig(
        hidden_size=64, num_attention_heads=8, num_key_value_heads=4, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 5e5}, tie_word_embeddings=True, **SHAPE,
    )  # fmt: skip
    cfg = model_config_from_hf(hf)
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.kv_heads, cfg.ff_dim) == (64, 3, 8, 4, 100)
    assert (cfg.seq_len, cfg.rope_theta, cfg.norm_eps, cfg.tie_embeddings) == (64, 5e5, 1e-5, True)
    assert cfg.residual.variant == "block"
