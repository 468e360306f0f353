"""`attnres sample`: text from a model trained by `attnres train`, and clear errors for bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from attnres.cli import main as cli
from attnres.model.generate import SamplingConfig
from attnres.sample import CheckpointError, load_for_sampling, stream_text


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sample") / "run"
    cli(["train", "--preset", "tiny", "--out", str(out), "--train.progress=false"])
    return out


def test_sample_streams_text_from_a_trained_checkpoint(run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    cli(["sample", "--ckpt", str(run_dir), "--prompt", "ROMEO:", "--max-new-tokens", "12", "--seed", "3"])
    printed = capsys.readouterr().out
    assert printed.startswith("ROMEO:") and len(printed) > len("ROMEO:\n")
    model, tok = load_for_sampling(run_dir / "checkpoint")
    pieces = list(stream_text(model, tok, "ROMEO:", 12, SamplingConfig(seed=3)))
    assert len(pieces) > 1, "text should arrive piece by piece"
    assert printed == "ROMEO:" + "".join(pieces) + "\n"


def test_sample_compile_prints_what_eager_prints(run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """``attnres sample --compile`` (greedy, so both pick the same tokens): the compiled decode step."""
    args = [
        "sample",
        "--ckpt",
        str(run_dir),
        "--prompt",
        "ROMEO:",
        "--max-new-tokens",
        "6",
        "--temperature",
        "0",
    ]
    capsys.readouterr()
    cli(args)
    eager = capsys.readouterr().out
    cli([*args, "--compile"])
    assert capsys.readouterr().out == eager


def test_missing_and_truncated_checkpoints_are_clear_errors(run_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_for_sampling(tmp_path / "nope")
    broken = tmp_path / "broken"
    shutil.copytree(run_dir / "checkpoint", broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_for_sampling(broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(CheckpointError):
        load_for_sampling(broken)


def test_bad_prompts_and_settings_exit_with_a_message(run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    model, tok = load_for_sampling(run_dir)
    with pytest.raises(ValueError, match="prompt is empty"):
        next(stream_text(model, tok, ""))
    with pytest.raises(ValueError, match="more than the model's context"):
        next(stream_text(model, tok, "a" * (model.cfg.seq_len + 1)))
    capsys.readouterr()
    for bad in (["--top-p", "0"], ["--top-p", "1.5"], ["--prompt", "a" * 100]):
        with pytest.raises(SystemExit) as exit_info:
            cli(["sample", "--ckpt", str(run_dir), "--prompt", "x", *bad])
        assert exit_info.value.code == 2
        captured = capsys.readouterr()
        assert captured.out == "" and "attnres sample: error:" in captured.err
