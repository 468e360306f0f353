"""Training end to end on the real Shakespeare corpus: learning, exact resume, compare, errors."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from attnres.analysis.results import summary_table
from attnres.cli import main
from attnres.configs import ConfigError, apply_overrides
from attnres.model import Transformer
from attnres.storage.checkpoint import checkpoint_path, load_model, record_checksums
from attnres.storage.tokenizer import tokenizer_key
from attnres.train import get_preset, train
from attnres.train.checkpoint import load_trainer_state
from attnres.train.compare import compare
from attnres.train.data import Batches, build_tokenizer, load_corpus, tokenize_corpus
from attnres.train.engine import evaluate


def tiny(cache_dir: str, **overrides: str):
    return apply_overrides(get_preset("tiny"), {"data.cache_dir": cache_dir, **overrides})


def test_short_run_lowers_validation_loss(tmp_path, cache_dir) -> None:
    cfg = tiny(cache_dir, **{"model.residual.variant": "block", "model.residual.block_size": "3"})
    corpus = load_corpus(cfg.data)
    tok = build_tokenizer(cfg.data, corpus)
    batches = Batches(*tokenize_corpus(cfg.data, corpus, tok, tokenizer_key(tok)), 32, 4, 0)
    torch.manual_seed(cfg.train.seed)
    before = evaluate(Transformer(cfg.model), batches.val_batches(cfg.train.eval_tokens), torch.device("cpu"))
    result = train(cfg, tmp_path / "run", log=lambda _: None)
    assert before > math.log(257) - 0.1  # near-uniform at init
    assert result.final_val_loss < before - 0.5
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 21))
    assert all("tokens_per_s" in m for m in metrics)
    assert json.loads((tmp_path / "run" / "run_info.json").read_text())["torch"] == torch.__version__


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_continues_exactly(tmp_path, cache_dir, optimizer: str) -> None:
    cfg = tiny(
        cache_dir, **{"model.residual.variant": "full", "optim.name": optimizer, "schedule.name": "wsd"}
    )
    train(cfg, tmp_path / "straight", log=lambda _: None)
    train(cfg, tmp_path / "split", log=lambda _: None, stop_after=7)
    assert not (tmp_path / "split" / "result.json").exists()
    first = load_trainer_state(tmp_path / "split")["timing"]
    assert first["timed_steps"] == 6 and 0 < first["timed_s"] < first["seconds"]
    result = train(cfg, tmp_path / "split", resume=True, log=lambda _: None)
    # the time and throughput of both sessions (the first step of each is not timed)
    end = load_trainer_state(tmp_path / "split")["timing"]
    assert end["timed_steps"] == cfg.train.steps - 2 and end["timed_s"] > first["timed_s"]
    assert result.seconds >= end["seconds"] > first["seconds"]
    tokens_per_step = cfg.train.batch_size * cfg.model.seq_len
    assert result.tokens_per_s == pytest.approx(tokens_per_step * end["timed_steps"] / end["timed_s"])

    def losses(run: str) -> list[float]:
        return [json.loads(x)["loss"] for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    assert losses("split") == losses("straight")  # bit for bit, including step 8 right after resuming
    a, _ = load_model(tmp_path / "straight")
    b, _ = load_model(tmp_path / "split")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_resume_from_a_checkpoint_without_timing(tmp_path, cache_dir) -> None:
    cfg = tiny(cache_dir, **{"train.steps": "4"})
    train(cfg, tmp_path / "run", log=lambda _: None, stop_after=2)
    path = checkpoint_path(tmp_path / "run") / "trainer_state.pt"
    state = torch.load(path, weights_only=True)
    del state["timing"]  # as written before timing was kept
    torch.save(state, path)
    record_checksums(path.parent)
    result = train(cfg, tmp_path / "run", resume=True, log=lambda _: None)
    assert math.isnan(result.seconds)  # the first session's time is unknown, not silently dropped
    assert math.isfinite(result.tokens_per_s)


def test_existing_run_is_never_overwritten(tmp_path, cache_dir) -> None:
    cfg = tiny(cache_dir, **{"train.steps": "2"})
    train(cfg, tmp_path / "run", log=lambda _: None)
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg, tmp_path / "run", log=lambda _: None)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(cfg, tmp_path / "other", resume=True, log=lambda _: None)


def test_compare_writes_summary_curves_and_table(tmp_path, cache_dir, capsys) -> None:
    cfg = tiny(cache_dir, **{"train.steps": "6", "train.eval_every": "3"})
    results = compare(cfg, ["prenorm", "full"], 2, tmp_path, log=lambda _: None)
    assert [(r.variant, r.seed) for r in results] == [
        ("prenorm", 0),
        ("prenorm", 1),
        ("full", 0),
        ("full", 1),
    ]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {"variant", "seed", "final_val_loss", "tokens_per_s", "n_params"} <= set(summary["runs"][0])
    full = summary["variants"][1]
    assert full["variant"] == "full" and full["seeds"] == 2 and full["diff_vs_prenorm"]["n"] == 2
    assert full["train_tokens"] == 6 * cfg.train.batch_size * cfg.model.seq_len and full["train_flops"] > 0
    assert (tmp_path / "full-s1" / "diagnostics.json").exists()  # saved with every finished run
    assert (tmp_path / "loss_curves.png").stat().st_size > 10_000
    table = summary_table(results)
    assert "prenorm" in table and "full" in table and "±" in table
    # Finished runs are reused, not retrained.
    again = compare(cfg, ["prenorm", "full"], 2, tmp_path, log=print)
    assert [dataclasses.asdict(r) for r in again] == [dataclasses.asdict(r) for r in results]
    assert capsys.readouterr().out.count("reusing") == 4


def test_same_data_order_for_every_variant(cache_dir) -> None:
    cfg = tiny(cache_dir)
    corpus = load_corpus(cfg.data)
    tok = build_tokenizer(cfg.data, corpus)
    ids = tokenize_corpus(cfg.data, corpus, tok, tokenizer_key(tok))
    a, b = Batches(*ids, 32, 4, seed=5), Batches(*ids, 32, 4, seed=5)
    assert torch.equal(a.train_batch(3)[0], b.train_batch(3)[0])
    assert not torch.equal(a.train_batch(3)[0], a.train_batch(4)[0])
    x, y = a.train_batch(0)
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_cli_train_and_unknown_override(tmp_path, cache_dir, capsys) -> None:
    main(
        [
            "train",
            "--preset",
            "tiny",
            "--out",
            str(tmp_path / "r"),
            "--train.steps=3",
            f"--data.cache_dir={cache_dir}",
            "--model.residual.variant",
            "block",
        ]
    )
    assert "final validation loss" in capsys.readouterr().out
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["model"]["residual"]["variant"] == "block" and saved["train"]["steps"] == 3
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--preset", "tiny", "--out", str(tmp_path / "s"), "--model.width=3"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown config key 'model.width'" in err and "model.d_model" in err


def test_override_types_are_checked() -> None:
    cfg = get_preset("tiny")
    with pytest.raises(ConfigError, match="train.steps expects an int"):
        apply_overrides(cfg, {"train.steps": "many"})
    with pytest.raises(ConfigError, match="model.tie_embeddings expects a bool"):
        apply_overrides(cfg, {"model.tie_embeddings": "maybe"})
    block = {"model.residual.variant": "block", "model.residual.block_size": "none"}
    assert apply_overrides(cfg, block).model.residual.block_size is None
    with pytest.raises(ValueError, match="unknown preset 'fast'; valid presets: .*quick"):
        get_preset("fast")


def test_compare_jobs_runs_in_parallel_processes(tmp_path, cache_dir) -> None:
    cfg = tiny(cache_dir, **{"train.steps": "3", "train.eval_every": "3"})
    results = compare(cfg, ["prenorm", "block"], 1, tmp_path, log=lambda _: None, jobs=2)
    serial = compare(cfg, ["prenorm", "block"], 1, tmp_path / "serial", log=lambda _: None)
    assert [(r.variant, r.final_val_loss) for r in results] == [(r.variant, r.final_val_loss) for r in serial]


def test_compare_restarts_a_run_killed_before_its_first_checkpoint(tmp_path, cache_dir) -> None:
    cfg = tiny(cache_dir, **{"train.steps": "4", "train.eval_every": "2"})
    killed = tmp_path / "prenorm-s0"
    killed.mkdir()
    (killed / "config.json").write_text("{}")  # what a run leaves before its first checkpoint
    (killed / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    (result,) = compare(cfg, ["prenorm"], 1, tmp_path, log=lambda _: None)
    assert result.steps == 4
    steps = [json.loads(x)["step"] for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
