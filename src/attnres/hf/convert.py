"""Convert between our checkpoints (``attnres train``) and transformers directories.

``to_hf(ckpt, out)`` writes ``out/`` with ``config.json`` (``model_type="attnres"``),
``model.safetensors`` (keys ``model.transformer.<native key>``), ``generation_config.json``, the
tokenizer as a ``PreTrainedTokenizerFast`` (``tokenizer.json`` + ``tokenizer_config.json``, so
``AutoTokenizer`` loads it offline; end-of-text is its bos, eos and pad token, and
``model_max_length`` is ``seq_len``), the model's code for ``trust_remote_code=True`` loading
(:mod:`attnres.hf.remote_code`), and ``attnres_train_config.json``: the full training config,
which lets ``from_hf`` restore the checkpoint exactly. ``from_hf(hf_dir, out)`` writes
``out/checkpoint/`` in the layout ``attnres.storage.checkpoint.load_model`` reads.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from attnres.configs import from_dict
from attnres.hf.config import AttnResConfig
from attnres.hf.modeling import AttnResForCausalLM
from attnres.model import Transformer
from attnres.storage.checkpoint import (
    WEIGHTS_ONLY_STATE,
    load_checkpoint_tokenizer,
    load_model,
    save_checkpoint,
)
from attnres.storage.config import TrainConfig
from attnres.storage.tokenizer import EOT, BPETokenizer, ByteTokenizer

TRAIN_CONFIG_FILE = "attnres_train_config.json"


def to_hf_model(model: Transformer, **config_kwargs: Any) -> AttnResForCausalLM:
    """Wrap a copy of ``model``'s weights in an :class:`AttnResForCausalLM` (bit-exact)."""
    hf = AttnResForCausalLM(AttnResConfig.from_model_config(model.cfg, **config_kwargs))
    hf.transformer.load_state_dict(model.state_dict())
    return hf.to(next(model.parameters()).dtype)


def from_hf_model(hf: AttnResForCausalLM) -> Transformer:
    """A native :class:`Transformer` with a copy of ``hf``'s weights (bit-exact)."""
    model = Transformer(hf.config.to_model_config())
    model.load_state_dict(hf.transformer.state_dict())
    return model.to(hf.dtype)


def _byte_level_chars() -> list[str]:
    """GPT-2's byte -> printable character table, as byte-level BPE vocabularies spell bytes.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes map, in order, to U+0100….
    """
    printable = {
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    }
    chars, shifted = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + shifted))
            shifted += 1
    return chars


def byte_tokenizer_json(eot: str) -> str:
    """A ``tokenizers`` JSON equal to our byte tokenizer: byte ``b`` is id ``b``, ``eot`` is id 256."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: b for b, c in enumerate(_byte_level_chars())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([eot])
    return tok.to_str()


def hf_tokenizer(ckpt: str | Path, model_max_length: int | None = None) -> Any:
    """Our checkpoint's tokenizer as a transformers ``PreTrainedTokenizerFast``.

    The end-of-text token is its ``eos``, ``bos`` and ``pad`` token: it is the one special token
    our tokenizers have, training separates documents with it (so it is also what a sequence
    starts after), and as padding it is always masked out, so its identity does not matter;
    ``Trainer``, ``DataCollatorForLanguageModeling`` and lm-eval then need no hand-set pad token.
    ``model_max_length`` (the model's ``seq_len``) makes ``truncation=True`` cut there.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    ours = load_checkpoint_tokenizer(ckpt)
    is_byte = isinstance(ours, ByteTokenizer)
    backend = Tokenizer.from_str(byte_tokenizer_json(EOT)) if is_byte else ours.tok
    extra = {} if model_max_length is None else {"model_max_length": model_max_length}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=EOT, bos_token=EOT, pad_token=EOT, **extra
    )


def to_hf(ckpt: str | Path, out: str | Path) -> Path:
    """Convert the checkpoint of ``attnres train`` (run dir or checkpoint dir) to a transformers dir."""
    model, train_cfg = load_model(ckpt)
    tokenizer = hf_tokenizer(ckpt, model_max_length=model.cfg.seq_len)
    out = Path(out)
    ids = {f"{t}_token_id": getattr(tokenizer, f"{t}_token_id") for t in ("bos", "eos", "pad")}
    hf = to_hf_model(model, **ids)
    hf.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / TRAIN_CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(train_cfg), indent=2))
    return out


def from_hf(hf_dir: str | Path, out: str | Path) -> Path:
    """Convert a transformers AttnRes dir back to our checkpoint layout in ``out/checkpoint``.

    The training config comes from ``attnres_train_config.json`` when ``to_hf`` wrote one, else it
    is the default ``TrainConfig`` with this model's ``model`` section. There is no optimiser state,
    so the result loads, evaluates and samples, but cannot ``--resume``.
    """
    hf_dir = Path(hf_dir)
    AttnResConfig.from_pretrained(hf_dir)  # a clear error for another architecture, before weights load
    if not any((hf_dir / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        raise FileNotFoundError(
            f"{hf_dir} holds no model.safetensors: weights are read from safetensors only, never from "
            "a pickled pytorch_model.bin (re-save it with save_pretrained(safe_serialization=True))"
        )
    model = from_hf_model(AttnResForCausalLM.from_pretrained(hf_dir, use_safetensors=True))
    stored = hf_dir / TRAIN_CONFIG_FILE
    if stored.is_file():
        train_cfg = from_dict(TrainConfig, json.loads(stored.read_text()))
        if train_cfg.model != model.cfg:
            raise ValueError(f"{stored} describes another model than {hf_dir / 'config.json'}; delete one")
    else:
        train_cfg = dataclasses.replace(TrainConfig(), model=model.cfg)
    return save_checkpoint(out, model, train_cfg, _our_tokenizer(hf_dir), trainer_state=WEIGHTS_ONLY_STATE)


def _our_tokenizer(hf_dir: Path) -> Any:
    """The tokenizer of a transformers dir as ours: the byte tokenizer if it is one, else a BPE."""
    from tokenizers import Tokenizer

    path = hf_dir / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{hf_dir} has no tokenizer.json; save the tokenizer there with save_pretrained"
        )
    text = path.read_text()
    # transformers rewrites the JSON on save; the vocabulary (bytes + EOT, no merged tokens) decides.
    byte_vocab = Tokenizer.from_str(byte_tokenizer_json(EOT)).get_vocab(with_added_tokens=True)
    if Tokenizer.from_str(text).get_vocab(with_added_tokens=True) == byte_vocab:
        return ByteTokenizer()
    return BPETokenizer(Tokenizer.from_str(text))
