"""What a resumed run or a rerun ``compare`` may change and what is refused (never a silent mix), and
config values that would otherwise be accepted without a word."""

from __future__ import annotations

import json
import shutil

import pytest

from attnres.cli import main
from attnres.configs import apply_overrides
from attnres.model import ModelConfig, Transformer
from attnres.storage.checkpoint import CHECKSUMS
from attnres.train import get_preset, train
from attnres.train.compare import compare, parse_variants
from attnres.train.loop import model_flops_per_token


def _tiny(cache_dir: str, steps: int = 4, **overrides: str):
    return apply_overrides(
        get_preset("tiny"), {"data.cache_dir": cache_dir, "train.steps": str(steps), **overrides}
    )


def _cli_train(run, cache_dir: str, *flags: str) -> None:
    main(["train", "--out", str(run), f"--data.cache_dir={cache_dir}", "--train.progress=false", *flags])


def test_resume_refuses_to_change_what_the_run_trains(tmp_path, cache_dir, capsys) -> None:
    run = tmp_path / "run"
    _cli_train(run, cache_dir, "--preset", "tiny", "--train.steps=2")
    for flag in ("--model.residual.variant=full", "--optim.lr=0.5", "--data.tokenizer=bpe"):
        with pytest.raises(SystemExit) as exit_info:
            _cli_train(run, cache_dir, "--resume", "--train.steps=3", flag)
        assert exit_info.value.code == 2
        assert f"cannot change {flag[2:].split('=')[0]}" in capsys.readouterr().err
    _cli_train(run, cache_dir, "--resume", "--train.steps=3", "--train.threads=1")  # allowed
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_resuming_a_finished_run_keeps_its_result(tmp_path, cache_dir) -> None:
    cfg = _tiny(cache_dir)
    first = train(cfg, tmp_path / "run", log=lambda _: None)
    again = train(cfg, tmp_path / "run", resume=True, log=lambda _: None)
    assert again == first
    assert (
        json.loads((tmp_path / "run" / "result.json").read_text())["final_val_loss"] == first.final_val_loss
    )
    with pytest.raises(ValueError, match="cannot be shortened"):
        train(_tiny(cache_dir, steps=2), tmp_path / "run", resume=True, log=lambda _: None)


def test_a_run_stopped_after_its_last_checkpoint_still_gets_a_result(tmp_path, cache_dir) -> None:
    cfg = _tiny(cache_dir)
    first = train(cfg, tmp_path / "run", log=lambda _: None)
    (tmp_path / "run" / "result.json").unlink()  # as if it stopped before writing it
    again = train(cfg, tmp_path / "run", resume=True, log=lambda _: None)
    assert again.final_val_loss == first.final_val_loss  # evaluated again, same weights
    assert again.final_train_loss == first.final_train_loss  # from metrics.jsonl


def test_compare_refuses_runs_of_another_config_and_extends_shorter_ones(tmp_path, cache_dir) -> None:
    quiet = {"log": lambda _: None}
    (short,) = compare(_tiny(cache_dir, steps=2), ["prenorm"], 1, tmp_path, **quiet)
    (longer,) = compare(_tiny(cache_dir, steps=4), ["prenorm"], 1, tmp_path, **quiet)  # continues it
    assert (short.steps, longer.steps) == (2, 4)
    assert longer.final_val_loss != short.final_val_loss
    with pytest.raises(ValueError, match="optim.lr differ"):
        compare(_tiny(cache_dir, steps=4, **{"optim.lr": "0.1"}), ["prenorm"], 1, tmp_path, **quiet)
    with pytest.raises(ValueError, match="more than once: prenorm"):
        parse_variants("prenorm,block,prenorm")
    with pytest.raises(ValueError, match="--seeds must be >= 1"):
        compare(_tiny(cache_dir), ["prenorm"], 0, tmp_path / "none", **quiet)


def test_tied_embeddings_count_the_lm_head_flops() -> None:
    cfg = ModelConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=2, seq_len=16)
    tied = ModelConfig(**{**cfg.__dict__, "tie_embeddings": True})
    assert model_flops_per_token(Transformer(tied)) == model_flops_per_token(Transformer(cfg))


@pytest.mark.parametrize("key", ["optim.lr", "optim.grad_clip", "optim.beta2"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_optimiser_settings_are_refused(key: str, value: str) -> None:
    with pytest.raises(ValueError, match=f"{key} must be a finite number"):
        apply_overrides(get_preset("tiny"), {key: value})


@pytest.mark.parametrize("tmp_complete", [True, False])
def test_a_checkpoint_swap_stopped_halfway_is_finished_not_lost(tmp_path, cache_dir, tmp_complete) -> None:
    cfg = _tiny(cache_dir)
    train(_tiny(cache_dir, steps=2), tmp_path / "run", log=lambda _: None)
    run = tmp_path / "run"
    # save_checkpoint stopped between moving the old checkpoint aside and moving the new one in
    shutil.copytree(run / "checkpoint", run / ".checkpoint.tmp")
    (run / "checkpoint").rename(run / ".checkpoint.old")
    if not tmp_complete:  # stopped while still writing the new one: the old one is put back
        (run / ".checkpoint.tmp" / CHECKSUMS).unlink()  # the file a checkpoint writes last
    result = train(cfg, run, resume=True, log=lambda _: None)
    assert result.steps == 4
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


@pytest.mark.parametrize("flag", ["--model.residual.variant=full", "--train.seed=3"])
def test_compare_refuses_flags_it_would_overwrite(tmp_path, flag: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--preset", "tiny", "--variants", "prenorm", "--out", str(tmp_path), flag])
    assert exit_info.value.code == 2
    assert "compare sets" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before any run started


def test_a_warmup_longer_than_the_run_is_pointed_out(tmp_path, cache_dir) -> None:
    lines: list[str] = []
    train(_tiny(cache_dir, steps=2, **{"schedule.warmup_steps": "5"}), tmp_path / "run", log=lines.append)
    assert any("warmup_steps=5 > train.steps=2" in line and "0.40 x optim.lr" in line for line in lines)


def test_compare_reuses_committed_results_without_checkpoints(tmp_path, cache_dir) -> None:
    cfg = _tiny(cache_dir, steps=3)
    first = compare(cfg, ["prenorm", "block"], 1, tmp_path, log=lambda _: None)
    for run in ("prenorm-s0", "block-s0"):  # what an experiment commits: results, never checkpoints
        shutil.rmtree(tmp_path / run / "checkpoint")
    lines: list[str] = []
    again = compare(cfg, ["prenorm", "block"], 1, tmp_path, log=lines.append)
    assert [r.final_val_loss for r in again] == [r.final_val_loss for r in first]
    assert sum("finished earlier, reusing its result" in line for line in lines) == 2
    with pytest.raises(ValueError, match=r"prenorm-s0 was trained with a different config \(optim.lr"):
        compare(
            _tiny(cache_dir, steps=3, **{"optim.lr": "0.5"}), ["prenorm"], 1, tmp_path, log=lambda _: None
        )
    with pytest.raises(ValueError, match="finished 3 steps and has no checkpoint to continue to 5"):
        compare(_tiny(cache_dir, steps=5), ["prenorm"], 1, tmp_path, log=lambda _: None)
