"""The transformers wrappers: native parity, save/load, Auto classes, generate, Trainer, bad input."""

from __future__ import annotations

import dataclasses
import json

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    LlamaConfig,
    Trainer,
    TrainingArguments,
)

from attnres.configs import ConfigError  # noqa: E402
from attnres.hf import AttnResConfig, AttnResForCausalLM, AttnResModel  # noqa: E402
from attnres.model import ModelConfig, lm_loss  # noqa: E402
from attnres.model.generate import SamplingConfig, generate, left_pad  # noqa: E402
from attnres.residuals import ResidualConfig, options_class, variant_names  # noqa: E402


def make_config(variant: str = "block", d: int = 32, tie: bool = False, **kw) -> AttnResConfig:
    base = dict(vocab_size=99, d_model=d, n_layers=2, n_heads=4 if d % 8 == 0 else 2, seq_len=32)
    base.update(kw)
    residual = dataclasses.asdict(ResidualConfig.for_variant(variant, block_size=3))
    return AttnResConfig(tie_embeddings=tie, residual=residual, **base)


def make_model(cfg: AttnResConfig, seed: int = 0) -> AttnResForCausalLM:
    torch.manual_seed(seed)
    model = AttnResForCausalLM(cfg).eval()
    residual = model.transformer.residual
    if hasattr(residual, "query"):  # non-zero queries, so that a lost or zeroed query changes the logits
        with torch.no_grad():
            residual.query.normal_(std=0.5)
    return model


def tokens(batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 99, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", ["prenorm", "block", "full"])
@pytest.mark.parametrize("d,tie", [(32, False), (100, True)], ids=["d32", "d100-tied"])
@pytest.mark.parametrize("seq", [1, 7])
def test_logits_equal_native(variant: str, d: int, tie: bool, seq: int) -> None:
    model = make_model(make_config(variant, d, tie))
    x = tokens(2, seq)
    out = model(input_ids=x, labels=x)
    native = model.transformer(x)
    assert torch.equal(out.logits, native)
    if seq > 1:
        torch.testing.assert_close(out.loss, lm_loss(native[:, :-1], x[:, 1:]), rtol=0, atol=1e-6)
    base = AttnResModel(model.config)
    base.load_state_dict(model.model.state_dict())
    assert torch.equal(base(x).last_hidden_state, model.transformer.norm(model.transformer.hidden(x)))


def test_loss_gradients_equal_native() -> None:
    model = make_model(make_config("block"))
    x = tokens(2, 7)
    model(input_ids=x, labels=x).loss.backward()
    hf_grads = {n: p.grad.clone() for n, p in model.transformer.named_parameters()}
    model.zero_grad()
    lm_loss(model.transformer(x)[:, :-1], x[:, 1:]).backward()
    for name, p in model.transformer.named_parameters():
        torch.testing.assert_close(hf_grads[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert hf_grads["residual.query"].abs().sum() > 0


@pytest.mark.parametrize("tie", [False, True])
def test_save_pretrained_roundtrip_bit_exact(tmp_path, tie: bool) -> None:
    model = make_model(make_config("block", tie=tie))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert not (tmp_path / "pytorch_model.bin").exists()
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "attnres"

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is AttnResForCausalLM
    assert type(AutoConfig.from_pretrained(tmp_path)) is AttnResConfig
    assert type(AutoModel.from_pretrained(tmp_path)) is AttnResModel
    assert loaded.config.to_model_config() == model.config.to_model_config()
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    for name, buf in model.transformer.named_buffers():  # non-persistent RoPE tables are rebuilt
        assert torch.equal(buf, dict(loaded.transformer.named_buffers())[name]), name
    assert (loaded.transformer.lm_head.weight is loaded.transformer.embed.weight) == tie
    x = tokens(2, 7)
    assert torch.equal(loaded.eval()(x).logits, model(x).logits)


@pytest.mark.parametrize("variant", ["prenorm", "block", "full"])
@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "recompute"])
def test_generate_greedy_equals_our_generate(variant: str, use_cache: bool) -> None:
    model = make_model(make_config(variant))
    prompt = tokens(2, 5)
    out = model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False, use_cache=use_cache)
    ours = generate(model.transformer, prompt.tolist(), 8, SamplingConfig(temperature=0))
    assert out[:, 5:].tolist() == ours


def test_generate_padded_batch_equals_rows_alone() -> None:
    """Left-padded prompts of different lengths: each row generates what it would alone."""
    model = make_model(make_config("block"), seed=3)
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    ids, mask = left_pad(prompts)
    for use_cache in (True, False):
        out = model.generate(
            ids, attention_mask=mask.long(), max_new_tokens=6, min_new_tokens=6, do_sample=False,
            pad_token_id=0, use_cache=use_cache,
        )  # fmt: skip
        for row, prompt in enumerate(prompts):
            alone = model.generate(
                torch.tensor([prompt]), max_new_tokens=6, min_new_tokens=6, do_sample=False
            )
            assert out[row, 5:].tolist() == alone[0, len(prompt) :].tolist(), (use_cache, row)
    assert generate(model.transformer, prompts, 6, SamplingConfig(temperature=0)) == out[:, 5:].tolist()


def test_padded_forward_logits_match_unpadded() -> None:
    model = make_model(make_config("full"))
    x = tokens(1, 4)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])
    got = model(input_ids=padded, attention_mask=mask).logits[:, 3:]
    torch.testing.assert_close(got, model(input_ids=x).logits, rtol=1e-5, atol=1e-5)


def test_beam_search_with_cache_equals_without() -> None:
    model = make_model(make_config("block"))
    prompt = tokens(2, 4)
    kw = dict(max_new_tokens=5, min_new_tokens=5, num_beams=3, do_sample=False, num_return_sequences=2)
    assert torch.equal(
        model.generate(prompt, use_cache=True, **kw), model.generate(prompt, use_cache=False, **kw)
    )


class _Repeat(torch.utils.data.Dataset):
    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


@pytest.mark.parametrize(
    "recipe", [{}, {"bf16": True, "gradient_checkpointing": True}], ids=["fp32", "bf16-checkpointed"]
)
def test_trainer_three_steps_lower_loss(tmp_path, recipe: dict) -> None:
    """``Trainer`` trains Block AttnRes, also as ``Trainer(bf16=True, gradient_checkpointing=True)``."""
    model = make_model(make_config("block"))
    rows = (torch.arange(16).repeat(4, 1) * 3 + torch.arange(4)[:, None]) % 99  # [4, 16] easy patterns
    with torch.no_grad():
        before = model(input_ids=rows, labels=rows).loss.item()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        warmup_steps=0,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        **recipe,
    )
    Trainer(model=model, args=args, train_dataset=_Repeat(rows)).train()
    if recipe:
        assert model.model.transformer.activation_checkpointing == "block"
    model.eval()
    with torch.no_grad():
        after = model(input_ids=rows, labels=rows).loss.item()
    assert after < before - 0.1, (before, after)
    assert model.transformer.residual.query.abs().sum() > 0  # the pseudo-queries were trained too


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"sliding_window": 4096}, "unsupported AttnResConfig key"),
        ({"attention_bias": True}, "unsupported AttnResConfig key"),
        ({"residual": {"variant": "nope"}}, "unknown residual variant"),
        ({"residual": {"blocks": 4}}, "unknown config key"),
        ({"d_model": 32, "n_heads": 3}, "not divisible"),
        ({"hidden_size": 32, "d_model": 64}, "both hidden_size"),
    ],
)
def test_bad_config_keys(kwargs: dict, match: str) -> None:
    with pytest.raises((ConfigError, ValueError), match=match):
        AttnResConfig(**kwargs)


#: a non-default value for each residual option (numbers and bools not listed are derived)
CHANGED_OPTIONS = dict(
    block_size=5, eps=1e-4, impl="fused", query="input", normalizer="sigmoid", key_norm=False, heads=2,
    query_init="zero", window=3, n_streams=2, dynamic=False, sinkhorn_iters=5, dilation=2, period=2,
    granularity="sublayer", gate_bias=-1.0,
)  # fmt: skip


def _changed_residual(variant: str) -> ResidualConfig:
    """``variant``'s config with every option off its default."""
    values = {}
    for f in dataclasses.fields(options_class(variant)):
        if f.name in CHANGED_OPTIONS:
            values[f.name] = CHANGED_OPTIONS[f.name]
        elif isinstance(f.default, bool):
            values[f.name] = not f.default
        elif isinstance(f.default, (int, float)):
            values[f.name] = f.default + 1
    return ResidualConfig(**{**values, "variant": variant})


@pytest.mark.parametrize("variant", variant_names())
def test_config_mirrors_every_model_config_field(tmp_path, variant: str) -> None:
    """AttnResConfig is generated from ModelConfig: every field, nested residual included, survives
    a JSON round trip with a non-default value."""
    mc = ModelConfig(
        vocab_size=77, d_model=48, n_layers=3, n_heads=6, n_kv_heads=2, d_ff=100, seq_len=40,
        rope_theta=5e5, norm_eps=1e-5, tie_embeddings=True, init_std=0.01,
        residual=_changed_residual(variant),
    )  # fmt: skip
    defaults = dataclasses.asdict(ModelConfig())
    changed = dataclasses.asdict(mc)
    assert all(changed[k] != defaults[k] for k in defaults), "test must change every field"
    own_defaults = dataclasses.asdict(ResidualConfig(variant=variant))
    assert all(changed["residual"][k] != own_defaults[k] for k in own_defaults if k != "variant")
    AttnResConfig.from_model_config(mc).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert {k: saved[k] for k in changed} == changed
    assert AutoConfig.from_pretrained(tmp_path).to_model_config() == mc


def test_hf_aliases() -> None:
    cfg = AttnResConfig(hidden_size=48, num_hidden_layers=3, num_attention_heads=6, tie_word_embeddings=True)
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.tie_embeddings) == (48, 3, 6, True)
    assert cfg.hidden_size == 48 and cfg.num_hidden_layers == 3


def test_other_architecture_checkpoint_is_refused(tmp_path) -> None:
    LlamaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4).save_pretrained(
        tmp_path
    )
    with pytest.raises(ConfigError, match="'llama' config, not an AttnRes"):
        AttnResForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"position_ids": torch.tensor([[5, 6, 7]])}, "position_ids"),
        ({"past_key_values": object()}, "past_key_values of type object"),
        ({"inputs_embeds": torch.zeros(1, 3, 32)}, "inputs_embeds"),
        ({"output_attentions": True}, "output_attentions"),
    ],
)
def test_unsupported_inputs_raise(kwargs: dict, match: str) -> None:
    model = make_model(make_config("block"))
    with pytest.raises(ValueError, match=match):
        model(input_ids=torch.tensor([[1, 2, 3]]), **kwargs)
    model(input_ids=torch.tensor([[1, 2, 3]]), attention_mask=torch.ones(1, 3, dtype=torch.long))


def test_an_old_config_json_with_a_flat_residual_loads(tmp_path) -> None:
    """A config.json saved before options were per variant: every variant's options in ``residual``."""
    cfg = make_config("full")
    cfg.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["residual"] = {
        "variant": "full", "block_size": 3, "eps": 1e-06, "query": "learned", "normalizer": "softmax",
        "key_norm": True, "heads": None, "query_init": None, "window": 8, "n_streams": 4, "dynamic": True,
        "sinkhorn_iters": 20, "dilation": 1, "period": 1, "granularity": "layer", "gate_bias": -2.0,
        "impl": "auto",
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert loaded.residual == dataclasses.asdict(ResidualConfig(variant="full"))  # migrated on load
    assert loaded.to_model_config() == cfg.to_model_config()
    saved["residual"] = {"variant": "full", "n_streams": 2}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match=r"no option residual\.n_streams \(an option of hc"):
        AutoConfig.from_pretrained(tmp_path)
