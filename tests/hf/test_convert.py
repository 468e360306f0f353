"""Conversion between native models/checkpoints and transformers directories."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from tokenizers import Tokenizer, pre_tokenizers  # noqa: E402

from attnres.hf.convert import (  # noqa: E402
    _byte_level_chars,
    byte_tokenizer_json,
    from_hf_model,
    to_hf_model,
)
from attnres.model import ModelConfig, Transformer  # noqa: E402
from attnres.residuals import ResidualConfig  # noqa: E402


@pytest.mark.parametrize("tie", [False, True])
def test_model_roundtrip_is_bit_exact(tie: bool) -> None:
    cfg = ModelConfig(
        vocab_size=99, d_model=32, n_layers=2, residual=ResidualConfig("block", 3), tie_embeddings=tie
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
