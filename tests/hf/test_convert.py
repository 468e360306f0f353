"""Conversion between native models/checkpoints and transformers directories."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from tokenizers import Tokenizer, pre_tokenizers  # noqa: E402
from transformers import AutoConfig, AutoTokenizer, LlamaConfig  # noqa: E402

from attnres.configs import ConfigError  # noqa: E402
from attnres.hf.convert import (  # noqa: E402
    _byte_level_chars,
    byte_tokenizer_json,
    from_hf,
    from_hf_model,
    to_hf,
    to_hf_model,
)
from attnres.model import ModelConfig, Transformer  # noqa: E402
from attnres.residuals import ResidualConfig  # noqa: E402

SRC = os.path.join(os.path.dirname(__file__), "..", "..", "src")


@pytest.mark.parametrize("tie", [False, True])
def test_model_roundtrip_is_bit_exact(tie: bool) -> None:
    cfg = ModelConfig(
        vocab_size=99,
        d_model=32,
        n_layers=2,
        residual=ResidualConfig("block", block_size=3),
        tie_embeddings=tie,
    )
    torch.manual_seed(0)
    native = Transformer(cfg).eval()
    with torch.no_grad():
        native.residual.query.normal_()
    hf = to_hf_model(native).eval()
    back = from_hf_model(hf).eval()
    x = torch.randint(0, 99, (2, 7))
    assert torch.equal(hf(x).logits, native(x))
    assert torch.equal(back(x), native(x))
    assert native.state_dict().keys() == back.state_dict().keys()
    for key, value in native.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    assert (back.lm_head.weight is back.embed.weight) == tie


def test_byte_tokenizer_json_matches_our_byte_ids() -> None:
    assert sorted(_byte_level_chars()) == sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer.from_str(byte_tokenizer_json("<|endoftext|>"))
    assert tok.get_vocab_size() == 257 and tok.token_to_id("<|endoftext|>") == 256
    for text in ["hello world", "  two  spaces\n\tand tabs", "héllo ✓ 日本語 🙂", ""]:
        ids = tok.encode(text).ids
        assert ids == list(text.encode("utf-8")), text
        assert tok.decode(ids) == text


def _tiny_run(tmp_path, cache_dir: str, variant: str = "block"):
    from attnres.configs import apply_overrides
    from attnres.train import get_preset, train

    cfg = apply_overrides(
        get_preset("tiny"),
        {"data.cache_dir": cache_dir, "model.residual.variant": variant, "train.steps": "5"},
    )
    train(cfg, tmp_path / "run", log=lambda _: None)
    return tmp_path / "run"


def test_trained_run_converts_loads_in_fresh_process_and_generates(tmp_path, cache_dir) -> None:
    """Done-criterion of the issue: `attnres train` -> `attnres convert --to-hf` -> plain transformers
    calls in a fresh process (AutoTokenizer + AutoModelForCausalLM + generate), no remote code."""
    from attnres.cli import main
    from attnres.storage.checkpoint import load_model

    run = _tiny_run(tmp_path, cache_dir)
    main(["convert", "--to-hf", str(run), str(tmp_path / "hf")])
    native, _ = load_model(run)
    x = torch.randint(0, 257, (2, 9))
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert torch.equal(hf(x).logits, native.eval()(x))
    code = (
        "import attnres.hf\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast\n"
        f"d = {str(tmp_path / 'hf')!r}\n"
        "tok, m = AutoTokenizer.from_pretrained(d), AutoModelForCausalLM.from_pretrained(d)\n"
        "ids = tok('To be, or not', return_tensors='pt').input_ids\n"
        "out = m.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)\n"
        "fast = isinstance(tok, PreTrainedTokenizerFast)\n"
        "print(fast, type(m).__name__, ids.tolist()[0] == list(b'To be, or not'), out.shape[1])\n"
        "print(repr(tok.decode(out[0])))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.path.abspath(SRC), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    first = res.stdout.splitlines()[0].split()
    assert first == ["True", "AttnResForCausalLM", "True", str(13 + 12)]
    assert eval(res.stdout.splitlines()[1]).startswith("To be, or not")


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_checkpoint_roundtrip_through_hf_is_bit_exact(tmp_path, tokenizer: str) -> None:
    from attnres.storage.checkpoint import load_model, save_checkpoint
    from attnres.storage.config import TrainConfig
    from attnres.storage.tokenizer import ByteTokenizer, load_tokenizer, train_bpe

    text = [
        "To be, or not to be, that is the question:\n",
        "Whether 'tis nobler in the mind to suffer\n",
    ] * 20
    tok = ByteTokenizer() if tokenizer == "byte" else train_bpe(text, 300)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, residual=ResidualConfig("full"))
    train_cfg = dataclasses.replace(TrainConfig(), model=cfg)
    model = Transformer(cfg)
    with torch.no_grad():
        model.residual.query.normal_()
    save_checkpoint(tmp_path / "run", model, train_cfg, tok, {"step": 0})
    to_hf(tmp_path / "run", tmp_path / "hf")
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    line = "To be, or not to be"
    assert hf_tok(line).input_ids == tok.encode(line)
    assert hf_tok.eos_token_id == tok.eos_id == AutoConfig.from_pretrained(tmp_path / "hf").eos_token_id

    from_hf(tmp_path / "hf", tmp_path / "back")
    back, back_cfg = load_model(tmp_path / "back")
    assert back_cfg == train_cfg
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    assert type(load_tokenizer(tmp_path / "back")) is type(tok)
    assert load_tokenizer(tmp_path / "back").encode(line) == tok.encode(line)


def test_from_hf_refuses_another_architecture(tmp_path) -> None:
    LlamaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4).save_pretrained(
        tmp_path / "llama"
    )
    with pytest.raises(ConfigError, match="'llama' config, not an AttnRes"):
        from_hf(tmp_path / "llama", tmp_path / "out")
