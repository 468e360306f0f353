"""Tokenizers and their file, ``tokenizer.json``: what a checkpoint saves and every reader loads.

Two kinds: :class:`ByteTokenizer` (UTF-8 bytes plus an end-of-text id; its file is a one-line
marker) and :class:`BPETokenizer` (a Hugging Face ``tokenizers`` byte-level BPE, saved as that
library's JSON). :func:`load_tokenizer` reads either, refusing anything else with the file named.
Building the configured tokenizer for a corpus (and caching it) is training's job
(:func:`attnres.train.data.build_tokenizer`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Protocol

EOT = "<|endoftext|>"


class Tokenizer(Protocol):
    """What the trainer and the samplers need from a tokenizer."""

    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def save(self, path: str | Path) -> None: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0–255, plus id 256 for end-of-text. No training, exactly reproducible."""

    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"type": "attnres-byte"}))


class BPETokenizer:
    """A byte-level BPE from Hugging Face ``tokenizers`` with an ``<|endoftext|>`` special token."""

    def __init__(self, tok: object) -> None:
        self.tok = tok
        self.vocab_size = tok.get_vocab_size()
        self.eos_id = tok.token_to_id(EOT)

    def encode(self, text: str) -> list[int]:
        # Line by line is several times faster than one huge string. It can split a newline from
        # the indentation after it differently than whole-string encoding would, but it is
        # deterministic, used for training and prompts alike, and decodes back to the same text.
        lines = text.splitlines(keepends=True)
        return [i for enc in self.tok.encode_batch(lines) for i in enc.ids] if lines else []

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def save(self, path: str | Path) -> None:
        self.tok.save(str(path))


def train_bpe(texts: list[str], vocab_size: int) -> BPETokenizer:
    """Train a byte-level BPE on ``texts`` (deterministic for the same input)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[EOT],
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return BPETokenizer(tok)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer saved by ``save``: a ``tokenizer.json`` file, or a run/checkpoint dir holding one.

    Raises:
        FileNotFoundError: no ``tokenizer.json`` at ``path``.
        ValueError: naming the file, when it is not JSON, not a tokenizer, or has no ``<|endoftext|>``.
    """
    p = Path(path)
    for candidate in (p, p / "tokenizer.json", p / "checkpoint" / "tokenizer.json"):
        if candidate.is_file():
            p = candidate
            break
    else:
        raise FileNotFoundError(f"no tokenizer.json at {path}")
    try:
        text = p.read_text(encoding="utf-8")
        data = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{p} is not a tokenizer file: it does not read as JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{p} is not a tokenizer file: it holds a JSON {type(data).__name__}, not an object")
    if data.get("type") == "attnres-byte":
        return ByteTokenizer()
    from tokenizers import Tokenizer as HFTokenizer

    try:
        tok = BPETokenizer(HFTokenizer.from_str(text))
    except Exception as e:  # tokenizers raises a bare Exception for any malformed tokenizer JSON
        raise ValueError(
            f"{p} is neither an attnres byte tokenizer nor a Hugging Face tokenizers file ({e})"
        ) from None
    if tok.eos_id is None:
        raise ValueError(f"{p} has no {EOT} token, which attnres tokenizers end every document with")
    return tok


def tokenizer_key(tok: Tokenizer) -> str:
    """A short hash identifying a tokenizer's exact vocabulary and merges."""
    if isinstance(tok, ByteTokenizer):
        return "byte"
    return hashlib.sha256(tok.tok.to_str().encode()).hexdigest()[:16]
