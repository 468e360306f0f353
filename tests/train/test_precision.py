"""``train.precision``: fp16-mixed with its gradient scaler, exact resume under every mode, errors."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from attnres.cli import main
from attnres.configs import apply_overrides
from attnres.storage.checkpoint import load_model
from attnres.storage.config import LoopConfig, TrainConfig, resume_conflicts
from attnres.train import engine as engine_module
from attnres.train import get_preset, train
from attnres.train.checkpoint import load_trainer_state
from attnres.train.precision import Precision, check_precision_supported


def tiny(cache_dir: str, **overrides: str) -> TrainConfig:
    return apply_overrides(get_preset("tiny"), {"data.cache_dir": cache_dir, **overrides})


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_fp16_mixed_cli_trains_five_steps_without_overflow(tmp_path: Path, cache_dir: str, capsys) -> None:
    out = tmp_path / "fp16"
    main(
        ["train", "--preset", "tiny", "--train.precision=fp16-mixed", "--train.steps=5", "--out", str(out),
         f"--data.cache_dir={cache_dir}", "--model.residual.variant=block"]
    )  # fmt: skip
    assert "final validation loss" in capsys.readouterr().out
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    # no overflow: the scale never backed off (a skipped step halves it), and every loss is finite
    assert [r["loss_scale"] for r in rows] == [2.0**16] * 5
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert load_trainer_state(out)["grad_scaler"]["scale"] == 2.0**16


def test_fp32_runs_have_no_scaler(tmp_path: Path, cache_dir: str) -> None:
    train(tiny(cache_dir, **{"train.steps": "2"}), tmp_path / "r", log=lambda _: None)
    assert "loss_scale" not in metrics(tmp_path / "r")[0]
    assert load_trainer_state(tmp_path / "r")["grad_scaler"] == {}


@pytest.mark.parametrize("precision", ["bf16-mixed", "fp16-mixed", "bf16-true"])
def test_resume_is_exact(
    tmp_path: Path, cache_dir: str, monkeypatch: pytest.MonkeyPatch, precision: str
) -> None:
    """Bitwise losses against the uninterrupted run, the fp16 scaler's state included.

    The scaler grows its scale after every step here (``growth_interval=1``), so it overflows and
    skips steps: a resumed run that restarted from a fresh scale would skip other steps.
    """
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, growth_interval=1))
    cfg = tiny(
        cache_dir, **{"train.precision": precision, "model.residual.variant": "block", "train.steps": "12"}
    )
    train(cfg, tmp_path / "straight", log=lambda _: None)
    train(cfg, tmp_path / "split", log=lambda _: None, stop_after=5)
    train(cfg, tmp_path / "split", resume=True, log=lambda _: None)
    straight, split = metrics(tmp_path / "straight"), metrics(tmp_path / "split")
    assert [r["loss"] for r in split] == [r["loss"] for r in straight]
    assert [r.get("val_loss") for r in split] == [r.get("val_loss") for r in straight]
    assert (
        load_trainer_state(tmp_path / "split")["grad_scaler"]
        == load_trainer_state(tmp_path / "straight")["grad_scaler"]
    )
    if precision == "fp16-mixed":
        scales = [r["loss_scale"] for r in straight]
        assert [r["loss_scale"] for r in split] == scales
        assert any(b < a for a, b in zip(scales, scales[1:], strict=False))  # it did skip (and back off)
    # the checkpoint loads as an ordinary fp32 model (bf16-true weights upcast exactly)
    model, _ = load_model(tmp_path / "split")
    assert next(model.parameters()).dtype == torch.float32


def test_evaluation_runs_under_the_run_precision(
    tmp_path: Path, cache_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[bool] = []
    loss = engine_module.lm_loss

    def spy(logits: torch.Tensor, targets: torch.Tensor, **kwargs: str) -> torch.Tensor:
        seen.append(torch.is_autocast_enabled("cpu") and logits.dtype == torch.bfloat16)
        return loss(logits, targets, **kwargs)

    monkeypatch.setattr(engine_module, "lm_loss", spy)
    cfg = tiny(cache_dir, **{"train.precision": "bf16-mixed", "train.steps": "1", "train.eval_tokens": "256"})
    train(cfg, tmp_path / "r", log=lambda _: None)
    assert len(seen) > 1 and all(seen)  # the training step and every evaluation batch


def test_bf16_true_trains_bf16_weights(tmp_path: Path, cache_dir: str) -> None:
    cfg = tiny(
        cache_dir, **{"train.precision": "bf16-true", "train.steps": "3", "model.residual.variant": "full"}
    )
    cfg.train.progress = False
    env = engine_module.DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    torch.manual_seed(0)
    engine = engine_module.build_engine(engine_module.Transformer(cfg.model), cfg, env)
    assert {p.dtype for p in engine.model.parameters()} == {torch.bfloat16}
    x = torch.randint(0, 257, (2, 33))
    before = engine.evaluate([(x[:, :-1], x[:, 1:])])
    for _ in range(3):
        engine.train_step(x[:, :-1], x[:, 1:])
    assert engine.evaluate([(x[:, :-1], x[:, 1:])]) < before


def test_bad_precision_names_the_valid_values() -> None:
    with pytest.raises(
        ValueError, match="train.precision='fp8' is not one of: fp32, bf16-mixed, fp16-mixed, bf16-true"
    ):
        LoopConfig(precision="fp8")
    with pytest.raises(ValueError, match="not one of: fp32, bf16-mixed"):
        check_precision_supported("half", torch.device("cpu"))


def test_cli_rejects_an_unknown_precision(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--preset", "tiny", "--out", str(tmp_path / "r"), "--train.precision=16-mixed"])
    assert exit_info.value.code == 2
    assert "fp32, bf16-mixed, fp16-mixed, bf16-true" in capsys.readouterr().err


@pytest.mark.parametrize("parallel", [{"parallel.pp": "2"}, {"parallel.dp_shard": "true"}])
def test_fp16_mixed_refused_where_its_scaler_cannot_agree_across_ranks(parallel: dict[str, str]) -> None:
    with pytest.raises(
        ValueError, match="fp16-mixed does not combine with .*use one of: fp32, bf16-mixed, bf16-true"
    ):
        apply_overrides(get_preset("tiny"), {"train.precision": "fp16-mixed", **parallel})


def test_bf16_refused_on_a_cuda_device_without_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla T4")
    for precision in ("bf16-mixed", "bf16-true"):
        with pytest.raises(ValueError, match=r"Tesla T4\) does not support; use one of: fp32, fp16-mixed"):
            Precision(precision, torch.device("cuda"))
    check_precision_supported("fp16-mixed", torch.device("cuda"))  # fine


def test_resume_may_not_change_the_precision() -> None:
    saved = get_preset("tiny")
    requested = apply_overrides(get_preset("tiny"), {"train.precision": "bf16-mixed"})
    assert resume_conflicts(saved, requested) == ["train.precision"]
