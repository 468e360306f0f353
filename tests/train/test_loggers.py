"""``--train.logger``: TensorBoard (read back with TensorBoard's own reader) and W&B offline, as a
side channel that never changes or stops the run."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from attnres.cli import main
from attnres.configs import apply_overrides
from attnres.train import get_preset, train
from attnres.train import loop as loop_module
from attnres.train.loggers import TENSORBOARD_DIR, WANDB_ID_FILE, TensorBoardLogger


def _tiny(cache_dir: str, **overrides: str):
    base = {
        "data.cache_dir": cache_dir,
        "model.residual.variant": "block",
        "model.residual.block_size": "2",
        "train.steps": "8",
        "train.eval_every": "4",
        "train.eval_tokens": "256",
    }
    return apply_overrides(get_preset("tiny"), {**base, **overrides})


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _untimed(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k != "tokens_per_s"} for m in metrics]


def _events(run: Path):
    tb = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    everything = {tb.SCALARS: 0, tb.IMAGES: 0}
    return tb.EventAccumulator(str(run / TENSORBOARD_DIR), size_guidance=everything).Reload()


def test_tensorboard_logs_the_metrics_and_diagnostics_and_resumes_at_the_checkpoint(
    tmp_path, cache_dir, monkeypatch
) -> None:
    pytest.importorskip("tensorboard")
    cfg = _tiny(cache_dir, **{"train.logger": "tensorboard", "train.checkpoint_every": "3"})
    real_lr = loop_module.lr_multiplier

    def crash_at_step_6(step, *args):  # steps 4 and 5 are logged past the checkpoint at 3
        if step == 5:
            raise RuntimeError("crash")
        return real_lr(step, *args)

    monkeypatch.setattr(loop_module, "lr_multiplier", crash_at_step_6)
    with pytest.raises(RuntimeError, match="crash"):
        train(cfg, tmp_path / "run", log=lambda _: None)
    monkeypatch.setattr(loop_module, "lr_multiplier", real_lr)
    train(cfg, tmp_path / "run", resume=True, log=lambda _: None)

    metrics = _metrics(tmp_path / "run")
    ea = _events(tmp_path / "run")
    # each step once: the events of steps 4 and 5 from the crashed session are purged
    loss = ea.Scalars("loss")
    assert [e.step for e in loss] == list(range(1, 9))
    assert [e.value for e in loss] == pytest.approx([m["loss"] for m in metrics], rel=1e-6)
    val = ea.Scalars("val_loss")
    assert [e.step for e in val] == [4, 8]
    assert [e.value for e in val] == pytest.approx([m["val_loss"] for m in metrics if "val_loss" in m])
    for tag in ("lr", "tokens_per_s", "grad_norm"):
        assert [e.step for e in ea.Scalars(tag)] == list(range(1, 9)), tag
    assert [e.value for e in ea.Scalars("grad_norm")] == pytest.approx([m["grad_norm"] for m in metrics])
    # diagnostics at each evaluation: per-sublayer scalars and the depth-weight heatmap
    diag = json.loads((tmp_path / "run" / "diagnostics.json").read_text())
    for s in diag["sublayers"]:
        for key in ("output_rms", "grad_norm"):
            events = ea.Scalars(f"diag/{key}/s{s['index']:02d}_{s['kind']}")
            assert [e.step for e in events] == [4, 8]
            assert events[-1].value == pytest.approx(s[key], rel=1e-5)  # the end-of-run diagnostics
    images = ea.Images("diag/depth_weights")
    assert [e.step for e in images] == [4, 8]
    assert images[-1].encoded_image_string.startswith(b"\x89PNG") and images[-1].width > 100


def test_a_logger_changes_no_loss_and_prenorm_has_no_heatmap(tmp_path, cache_dir) -> None:
    pytest.importorskip("tensorboard")
    plain = _tiny(cache_dir, **{"train.steps": "4", "train.eval_every": "2"})
    train(plain, tmp_path / "none", log=lambda _: None)
    train(apply_overrides(plain, {"train.logger": "tensorboard"}), tmp_path / "tb", log=lambda _: None)
    # the diagnostics at each evaluation leave the training untouched, bit for bit
    assert _untimed(_metrics(tmp_path / "tb")) == _untimed(_metrics(tmp_path / "none"))
    prenorm = apply_overrides(plain, {"train.logger": "tensorboard", "model.residual.variant": "prenorm"})
    train(prenorm, tmp_path / "prenorm", log=lambda _: None)
    ea = _events(tmp_path / "prenorm")
    assert "diag/output_rms/s00_attn" in ea.Tags()["scalars"] and ea.Tags()["images"] == []


def test_a_failing_logger_warns_and_the_run_goes_on(tmp_path, cache_dir, monkeypatch) -> None:
    pytest.importorskip("tensorboard")

    def broken(self, step, values):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(TensorBoardLogger, "log_scalars", broken)
    cfg = _tiny(cache_dir, **{"train.steps": "3", "train.logger": "tensorboard"})
    with pytest.warns(RuntimeWarning, match="train.logger=tensorboard failed .*the run goes on") as caught:
        result = train(cfg, tmp_path / "run", log=lambda _: None)
    assert len([w for w in caught if "train.logger" in str(w.message)]) == 1  # once, then silent
    assert result.steps == 3 and [m["step"] for m in _metrics(tmp_path / "run")] == [1, 2, 3]


def test_a_missing_logger_package_is_one_line_before_the_run_starts(tmp_path, capsys, monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--preset", "tiny", "--out", str(tmp_path / "run"), "--train.logger=wandb"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1
        and "train.logger=wandb needs the wandb package: pip install 'attnres[log]'" in err
    )
    assert not (tmp_path / "run").exists()


def test_grad_norm_is_recorded_when_clipping_computes_it(tmp_path, cache_dir) -> None:
    cfg = _tiny(cache_dir, **{"train.steps": "2", "train.eval_every": "2", "optim.grad_clip": "0"})
    train(cfg, tmp_path / "off", log=lambda _: None)
    assert all("grad_norm" not in m for m in _metrics(tmp_path / "off"))  # not computed: not invented
    train(apply_overrides(cfg, {"optim.grad_clip": "1e9"}), tmp_path / "on", log=lambda _: None)
    assert all(m["grad_norm"] > 0 for m in _metrics(tmp_path / "on"))
    # a clip that never binds trains as no clip
    assert [m["loss"] for m in _metrics(tmp_path / "on")] == [m["loss"] for m in _metrics(tmp_path / "off")]


def test_compare_logs_each_run_into_its_own_directory(tmp_path, cache_dir) -> None:
    pytest.importorskip("tensorboard")
    main([
        "compare", "--preset", "tiny", "--variants", "prenorm,full", "--out", str(tmp_path),
        f"--data.cache_dir={cache_dir}", "--train.steps=2", "--train.logger=tensorboard",
    ])  # fmt: skip
    for run in ("prenorm-s0", "full-s0"):
        assert [e.step for e in _events(tmp_path / run).Scalars("val_loss")] == [2]


def test_wandb_offline_keeps_its_run_id_across_a_resume(tmp_path, cache_dir, monkeypatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    cfg = _tiny(cache_dir, **{"train.steps": "4", "train.eval_every": "2", "train.logger": "wandb"})
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the logger must not have failed
        train(cfg, tmp_path / "run", log=lambda _: None, stop_after=2)
        run_id = (tmp_path / "run" / WANDB_ID_FILE).read_text().strip()
        train(cfg, tmp_path / "run", resume=True, log=lambda _: None)
    assert (tmp_path / "run" / WANDB_ID_FILE).read_text().strip() == run_id
    sessions = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(sessions) == 2 and all(s.name.endswith(run_id) for s in sessions)
    assert all(any(f.suffix == ".wandb" and f.stat().st_size > 0 for f in s.iterdir()) for s in sessions)
    # the heatmap of each evaluation (W&B names a media file <key>_<step>_<hash>.png)
    heatmaps = [p.name for s in sessions for p in (s / "files" / "media" / "images" / "diag").iterdir()]
    assert sorted(name.split("_")[2] for name in heatmaps) == ["2", "4"]
