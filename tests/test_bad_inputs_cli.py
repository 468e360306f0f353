"""Bad inputs and a hostile environment: one line on stderr and exit status 2, never a traceback.

Each row of :data:`CASES` prepares files under ``tmp_path`` and returns the ``attnres`` argv (and,
for a variable read at import, the environment of a fresh interpreter), with a fragment of the
expected message. Focused tests below cover what a message alone cannot show: a corrupt cache is
rebuilt, and a checkpoint that hit a full disk leaves the previous one in place.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

import attnres
from attnres.cli import main
from attnres.storage import checkpoint as ckpt
from attnres.storage.config import DataConfig
from attnres.storage.tokenizer import ByteTokenizer
from attnres.train import data
from attnres.train.checkpoint import load_trainer_state

SRC = str(Path(attnres.__file__).parents[1])


def corpus_file(root: Path) -> Path:
    """A 20k-character text corpus (byte-tokenised in milliseconds, unlike Shakespeare)."""
    path = root / "corpus.txt"
    if not path.exists():
        lines = [
            f"line {i}: the quick brown fox {i * 7919 % 1000} jumps over the lazy dog.\n" for i in range(400)
        ]
        path.write_text("".join(lines))
    return path


def train_argv(tmp_path: Path, out: Path | str, *flags: str) -> list[str]:
    """``attnres train`` of the tiny preset on :func:`corpus_file`, caching under ``tmp_path/cache``."""
    return [
        "train",
        "--preset",
        "tiny",
        "--out",
        str(out),
        "--data.corpus=text",
        f"--data.path={corpus_file(tmp_path)}",
        f"--data.cache_dir={tmp_path / 'cache'}",
        "--train.steps=2",
        *flags,
    ]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-step run, whose checkpoint the tokenizer cases copy and damage."""
    root = tmp_path_factory.mktemp("run")
    main(train_argv(root, root / "run", "--train.steps=1"))
    return root / "run"


def a_file(tmp_path: Path) -> Path:
    path = tmp_path / "a_file"
    path.write_text("not a directory\n")
    return path


def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def disk_full_on_second_checkpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    """The checkpoint writer's weights file is written once, then fails as a full disk does."""
    calls = []
    real_save = ckpt.st_save_model

    def save(model: torch.nn.Module, filename: str, *args: object, **kwargs: object) -> None:
        calls.append(filename)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        real_save(model, filename, *args, **kwargs)

    monkeypatch.setattr(ckpt, "st_save_model", save)


def sample_with_tokenizer(content: bytes) -> Callable[[Path, Path], list[str]]:
    """``attnres sample`` on a copy of the trained run whose ``tokenizer.json`` holds ``content``."""

    def prepare(tmp_path: Path, run: Path) -> list[str]:
        import shutil

        copy = shutil.copytree(run / "checkpoint", tmp_path / "checkpoint")
        (copy / "tokenizer.json").write_bytes(content)
        ckpt.record_checksums(copy)  # damage the checksums do not flag: the tokenizer loader's own checks
        return ["sample", "--ckpt", str(copy), "--prompt", "line", "--max-new-tokens", "2"]

    return prepare


#: (prepare(tmp_path, monkeypatch, trained_run) -> argv, extra environment or None, message fragments)
Prepare = Callable[[Path, pytest.MonkeyPatch, Path], list[str]]
CASES = [
    pytest.param(
        lambda t, m, r: train_argv(t, a_file(t) / "run"),
        None,
        ["attnres train: error: cannot create run directory", "a_file is a file, not a directory"],
        id="out-under-a-file",
    ),
    pytest.param(
        lambda t, m, r: train_argv(t, a_file(t)),
        None,
        ["cannot create run directory", "a_file is a file, not a directory"],
        id="out-is-a-file",
    ),
    pytest.param(
        lambda t, m, r: [*train_argv(t, t / "run"), f"--data.cache_dir={a_file(t) / 'cache'}"],
        None,
        ["cannot create cache directory", "a_file is a file, not a directory"],
        id="cache-dir-under-a-file",
    ),
    pytest.param(
        lambda t, m, r: (no_cuda(m), train_argv(t, t / "run", "--train.device=cuda"))[1],
        None,
        ["attnres train: error: train.device=cuda but CUDA is not available"],
        id="cuda-without-cuda",
    ),
    pytest.param(
        lambda t, m, r: train_argv(t, t / "run", "--train.device=tpu"),
        None,
        ["train.device='tpu' is not one of: auto, cpu, cuda"],
        id="unknown-device",
    ),
    pytest.param(
        lambda t, m, r: train_argv(t, t / "run"),
        {"ATTNRES_KERNELS": "bogus"},
        ["attnres: error: environment variable ATTNRES_KERNELS", "'bogus'", "auto, torch, triton, native"],
        id="attnres-kernels-bogus",
    ),
    pytest.param(
        lambda t, m, r: sample_with_tokenizer(b"not json at all")(t, r),
        None,
        ["attnres sample: error:", "tokenizer.json is not a tokenizer file: it does not read as JSON"],
        id="tokenizer-not-json",
    ),
    pytest.param(
        lambda t, m, r: sample_with_tokenizer(bytes(range(256)) * 4)(t, r),
        None,
        ["tokenizer.json is not a tokenizer file: it does not read as JSON", "utf-8"],
        id="tokenizer-random-bytes",
    ),
    pytest.param(
        lambda t, m, r: sample_with_tokenizer(b"[1, 2, 3]")(t, r),
        None,
        ["tokenizer.json is not a tokenizer file: it holds a JSON list"],
        id="tokenizer-json-list",
    ),
    pytest.param(
        lambda t, m, r: sample_with_tokenizer(b'{"model": {"type": "BPE"}}')(t, r),
        None,
        ["tokenizer.json is neither an attnres byte tokenizer nor a Hugging Face tokenizers file"],
        id="tokenizer-json-object-of-garbage",
    ),
    pytest.param(
        lambda t, m, r: (
            disk_full_on_second_checkpoint(m),
            train_argv(t, t / "run", "--train.checkpoint_every=1"),
        )[1],
        None,
        ["no space left on device writing", "model.safetensors", "the previous checkpoint in", "is kept"],
        id="disk-full-writing-a-checkpoint",
    ),
]


@pytest.mark.parametrize(("prepare", "env", "fragments"), CASES)
def test_bad_input_is_one_line(
    prepare: Prepare,
    env: dict[str, str] | None,
    fragments: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    trained_run: Path,
) -> None:
    argv = prepare(tmp_path, monkeypatch, trained_run)
    if env is None:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        code, stderr = exit_info.value.code, capsys.readouterr().err
    else:  # read when attnres.ops.dispatch is imported: needs a fresh interpreter
        proc = subprocess.run(
            [sys.executable, "-m", "attnres.cli", *argv],
            env={**os.environ, "PYTHONPATH": SRC, **env},
            capture_output=True,
            text=True,
            timeout=120,
        )
        code, stderr = proc.returncode, proc.stderr
    assert code == 2, stderr
    assert "Traceback" not in stderr
    error_lines = [ln for ln in stderr.splitlines() if ": error: " in ln]
    assert len(error_lines) == 1, stderr
    for fragment in fragments:
        assert fragment in error_lines[0], stderr


def test_a_bug_keeps_its_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the user's and the machine's errors become one line; a RuntimeError or KeyError does not."""
    import attnres.train

    for error in (RuntimeError("a bug"), KeyError("a bug"), OSError(errno.EIO, "I/O error")):

        def broken(*args: object, error: Exception = error, **kwargs: object) -> None:
            raise error

        monkeypatch.setattr(attnres.train, "train", broken)
        with pytest.raises(type(error)):
            main(train_argv(tmp_path, tmp_path / "run"))


def test_disk_full_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    disk_full_on_second_checkpoint(monkeypatch)
    run = tmp_path / "run"
    with pytest.raises(SystemExit):
        main(train_argv(tmp_path, run, "--train.steps=3", "--train.checkpoint_every=1"))
    assert "no space left on device" in capsys.readouterr().err
    assert load_trainer_state(run)["step"] == 1  # the step-1 checkpoint, whole
    assert not (run / ".checkpoint.tmp").exists()  # the failed one's partial files are freed
    monkeypatch.undo()  # space freed: the run continues from it
    main([*train_argv(tmp_path, run, "--train.steps=3"), "--resume"])
    assert load_trainer_state(run)["step"] == 3


def test_corrupt_token_cache_is_rebuilt_and_the_run_succeeds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main(train_argv(tmp_path, tmp_path / "first"))
    (cached,) = (tmp_path / "cache").glob("tokens-*.npz")
    good = cached.read_bytes()
    cached.write_bytes(good[: len(good) // 2])  # truncated, as by a crash or a full disk
    with pytest.warns(UserWarning, match=rf"corrupt cache file {cached}.*rebuilding it"):
        main(train_argv(tmp_path, tmp_path / "second"))
    assert "final validation loss" in capsys.readouterr().out
    assert cached.read_bytes() == good  # rebuilt in place, so the next run reads it silently


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    with path.open("wb") as f:  # a file object: np.savez would add a second .npz suffix to a name
        np.savez(f, **arrays)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with path.open("wb") as f:
        np.save(f, array)


TOKENS = np.arange(100, dtype=np.int32) % 257


@pytest.mark.parametrize(
    ("write", "problem"),
    [
        pytest.param(lambda p: p.write_bytes(b"garbage"), "pickled", id="garbage"),
        pytest.param(lambda p: p.write_bytes(b""), "EOFError", id="empty"),
        pytest.param(lambda p: _save_npy(p, TOKENS), "not an .npz archive", id="npy-not-npz"),
        pytest.param(lambda p: _save_npz(p, train=TOKENS), "KeyError", id="missing-val"),
        pytest.param(
            lambda p: _save_npz(p, train=TOKENS, val=TOKENS + 300), "outside the tokenizer", id="ids-range"
        ),
        pytest.param(
            lambda p: _save_npz(p, train=TOKENS.astype(np.int64), val=TOKENS), "not 1-D int32", id="dtype"
        ),
        pytest.param(
            lambda p: _save_npz(p, train=np.array([{"x": 1}], dtype=object), val=TOKENS),
            "allow_pickle=False",
            id="pickled-objects",
        ),
    ],
)
def test_token_cache_damage_is_named_and_rebuilt(
    write: Callable[[Path], object], problem: str, tmp_path: Path
) -> None:
    cfg = DataConfig(
        corpus="text", path=str(corpus_file(tmp_path)), tokenizer="byte", cache_dir=str(tmp_path)
    )
    corpus, tok = data.load_corpus(cfg), ByteTokenizer()
    fresh = data.tokenize_corpus(cfg, corpus, tok, "byte")
    (cached,) = tmp_path.glob("tokens-*.npz")
    write(cached)
    with pytest.warns(UserWarning, match=problem):
        rebuilt = data.tokenize_corpus(cfg, corpus, tok, "byte")
    assert all(torch.equal(a, b) for a, b in zip(fresh, rebuilt, strict=True))


def test_corrupt_cached_tokenizer_is_retrained(tmp_path: Path) -> None:
    cfg = DataConfig(
        corpus="text",
        path=str(corpus_file(tmp_path)),
        tokenizer="bpe",
        vocab_size=300,
        cache_dir=str(tmp_path),
    )
    corpus = data.load_corpus(cfg)
    tok = data.build_tokenizer(cfg, corpus)
    (cached,) = tmp_path.glob("bpe-*.json")
    good = cached.read_text()
    cached.write_text(good[:100])  # truncated
    with pytest.warns(UserWarning, match=rf"corrupt cache file {cached}.*not a tokenizer file"):
        again = data.build_tokenizer(cfg, corpus)
    assert again.encode("the quick brown fox") == tok.encode("the quick brown fox")
    assert cached.read_text() == good
