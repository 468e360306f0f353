"""Run directories from someone else are safe to resume, and no run hangs, collides or dead-ends.

One test per guard: a pickle that runs code is refused (resume and compare), a second run into a
held directory is refused naming the holder, Ctrl-C/SIGTERM leave a resumable checkpoint, a run
without a checkpoint restarts in place, a torn metrics line resumes, a flipped byte is named.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from attnres.cli import main
from attnres.configs import apply_overrides
from attnres.storage.checkpoint import (
    CHECKPOINT_FILES,
    CheckpointError,
    load_checkpoint_tokenizer,
    load_config,
    load_model,
    record_checksums,
)
from attnres.train import get_preset, train
from attnres.train.checkpoint import load_trainer_state
from attnres.train.compare import compare
from attnres.train.run_dir import LOCK_FILE, RunDirBusy, TrainingInterrupted, metrics_up_to


def _tiny(cache_dir: str, steps: int = 3, **overrides: str):
    return apply_overrides(
        get_preset("tiny"), {"data.cache_dir": cache_dir, "train.steps": str(steps), **overrides}
    )


def _quiet(_msg: str) -> None:
    pass


class _RunsCode:
    """Unpickling this runs ``os.system``: what a malicious trainer_state.pt would hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant_malicious_state(run: Path, marker: Path) -> None:
    state_file = run / "checkpoint" / "trainer_state.pt"
    state = torch.load(state_file, weights_only=True)
    state["payload"] = _RunsCode(marker)
    torch.save(state, state_file)
    record_checksums(state_file.parent)  # the attacker rewrites the checksum too


def test_a_trainer_state_that_would_run_code_is_refused_on_resume(tmp_path, cache_dir) -> None:
    run, marker = tmp_path / "run", tmp_path / "pwned"
    train(_tiny(cache_dir, steps=2), run, log=_quiet)
    _plant_malicious_state(run, marker)
    for steps in (2, 4):  # nothing left to train, and a real continuation
        with pytest.raises(CheckpointError, match="refused to load .*trainer_state.pt"):
            train(_tiny(cache_dir, steps=steps), run, resume=True, log=_quiet)
    assert not marker.exists()


def test_compare_never_runs_a_planted_trainer_state(tmp_path, cache_dir) -> None:
    marker = tmp_path / "pwned"
    cfg = _tiny(cache_dir, steps=4)
    train(_tiny(cache_dir, steps=2), tmp_path / "cmp" / "prenorm-s0", log=_quiet)  # an unfinished run
    _plant_malicious_state(tmp_path / "cmp" / "prenorm-s0", marker)
    with pytest.raises(CheckpointError, match="refused to load"):
        compare(cfg, ["prenorm"], 1, tmp_path / "cmp", log=_quiet)
    assert not marker.exists()


_HOLD_LOCK = """
import sys, time
from attnres.train.run_dir import RunDirLock
with RunDirLock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_run_into_a_held_directory_is_refused_naming_the_holder(tmp_path, cache_dir) -> None:
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirBusy, match=f"in use by another attnres run \\(pid {holder.pid} on "):
            train(_tiny(cache_dir), run, log=_quiet)
        assert list(run.iterdir()) == [run / LOCK_FILE]  # refused before anything was written
    finally:
        holder.kill()
        holder.wait()
    train(_tiny(cache_dir), run, log=_quiet)  # the holder is gone (killed): its lock went with it


def _start_cli_run(run: Path, cache_dir: str, *flags: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "attnres.cli", "train", "--preset", "tiny", "--out", str(run)]
    argv += [f"--data.cache_dir={cache_dir}", "--train.steps=100000", "--train.eval_every=100000", *flags]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_steps(run: Path, proc: subprocess.Popen, n: int, timeout: float = 120) -> None:
    metrics, deadline = run / "metrics.jsonl", time.monotonic() + timeout
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= n):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run did not start in time"
        time.sleep(0.2)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_leave_a_resumable_checkpoint(tmp_path, cache_dir, sig) -> None:
    run = tmp_path / "run"
    proc = _start_cli_run(run, cache_dir)
    _wait_for_steps(run, proc, 3)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    step = load_trainer_state(run)["step"]
    assert f"interrupted; checkpoint at step {step} saved in {run}" in err and "--resume" in err
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, step + 1))  # metrics and checkpoint agree
    main(["train", "--out", str(run), "--resume", f"--train.steps={step + 2}"])
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, step + 3))


def test_the_interruption_survives_compare_jobs_process_pool() -> None:
    import pickle

    again = pickle.loads(pickle.dumps(TrainingInterrupted(Path("runs/a"), 7, saved=True)))
    assert (again.out, again.step, again.saved) == (Path("runs/a"), 7, True) and "step 7" in str(again)


def test_a_run_killed_before_its_first_checkpoint_restarts_in_place(tmp_path, cache_dir, capsys) -> None:
    run = tmp_path / "run"
    proc = _start_cli_run(run, cache_dir)  # tiny checkpoints only at the end
    _wait_for_steps(run, proc, 2)
    proc.kill()  # SIGKILL: no chance to save
    proc.communicate()
    assert (run / "config.json").exists() and not (run / "checkpoint").exists()
    with pytest.raises(SystemExit):  # a fresh run says how to go on
        main(["train", "--preset", "tiny", "--out", str(run), f"--data.cache_dir={cache_dir}"])
    assert "pass --resume to start it over in place" in capsys.readouterr().err
    main(["train", "--out", str(run), "--resume", "--train.steps=3"])  # the saved config, shortened
    assert "starting it over" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_a_torn_metrics_line_is_dropped_and_the_run_resumes(tmp_path, cache_dir) -> None:
    run = tmp_path / "run"
    train(_tiny(cache_dir, steps=3), run, log=_quiet, stop_after=2)
    metrics = run / "metrics.jsonl"
    with metrics.open("a") as f:
        f.write('{"step": 3, "loss": 5.1')  # a crash mid-write
    with pytest.warns(UserWarning, match="dropped an incomplete last line"):
        train(_tiny(cache_dir, steps=3), run, resume=True, log=_quiet)
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3]


def test_a_corrupt_metrics_line_inside_the_file_is_named(tmp_path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="metrics.jsonl line 2 is not a metrics record"):
        metrics_up_to(metrics, 2)


def test_the_metrics_rewrite_is_atomic(tmp_path, monkeypatch) -> None:
    metrics = tmp_path / "metrics.jsonl"
    original = "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 51))
    metrics.write_text(original)

    def killed(*_args: object) -> None:
        raise KeyboardInterrupt  # stopped between writing the new file and renaming it

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        metrics_up_to(metrics, 10)
    assert metrics.read_text() == original


_READS = {  # which loader reads each checkpoint file
    "model.safetensors": load_model,
    "config.json": load_config,
    "tokenizer.json": load_checkpoint_tokenizer,
    "trainer_state.pt": load_trainer_state,
}


@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_a_flipped_byte_in_any_checkpoint_file_is_named(tmp_path, cache_dir, capsys, name: str) -> None:
    run = tmp_path / "run"
    train(_tiny(cache_dir, steps=2), run, log=_quiet)
    path = run / "checkpoint" / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{name} does not match the sha256"):
        _READS[name](run)
    if name != "trainer_state.pt":  # sample reads the other three
        with pytest.raises(SystemExit):
            main(["sample", "--ckpt", str(run), "--prompt", "To be"])
        assert f"{name} does not match the sha256" in capsys.readouterr().err


def test_a_checkpoint_from_before_checksums_still_loads_with_a_warning(tmp_path, cache_dir) -> None:
    run = tmp_path / "run"
    train(_tiny(cache_dir, steps=2), run, log=_quiet)
    (run / "checkpoint" / "checksums.json").unlink()
    with pytest.warns(UserWarning, match="no checksums.json .* not verified"):
        load_model(run)


def test_copying_a_run_directory_keeps_it_resumable(tmp_path, cache_dir) -> None:
    train(_tiny(cache_dir, steps=2), tmp_path / "a", log=_quiet)
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # the lock file travels with it, unheld
    assert train(_tiny(cache_dir, steps=3), tmp_path / "b", resume=True, log=_quiet).steps == 3


# Damaged or foreign checkpoints: one row per case, each a function that damages a trained run
# (``run``; ``tmp`` for scratch files) and returns the CLI arguments that then meet it.
def _rewrite(run: Path, name: str, data: bytes) -> None:
    (run / "checkpoint" / name).write_bytes(data)
    record_checksums(run / "checkpoint")  # damage the checksums cannot see: the loader's own checks


def _truncated_state(run: Path, tmp: Path) -> list[str]:
    _rewrite(run, "trainer_state.pt", (run / "checkpoint" / "trainer_state.pt").read_bytes()[:100])
    return ["train", "--out", str(run), "--resume", "--train.steps=4"]


def _random_state(run: Path, tmp: Path) -> list[str]:
    _rewrite(run, "trainer_state.pt", os.urandom(2000))
    return ["train", "--out", str(run), "--resume", "--train.steps=4"]


@pytest.mark.parametrize("seed", range(40))
def test_random_bytes_as_trainer_state_are_always_corrupted_not_a_crash(tmp_path, seed: int) -> None:
    # garbage fails the weights-only unpickler in many ways (UnpicklingError, IndexError, KeyError …)
    ckpt = tmp_path / "checkpoint"
    ckpt.mkdir()
    for name in CHECKPOINT_FILES:
        (ckpt / name).write_bytes(b"{}")
    (ckpt / "trainer_state.pt").write_bytes(random.Random(seed).randbytes(200 + 50 * seed))
    record_checksums(ckpt)
    with pytest.raises(CheckpointError, match="is corrupted or truncated"):
        load_trainer_state(ckpt)


def _state_of_another_kind(run: Path, tmp: Path) -> list[str]:
    torch.save({"step": 2}, run / "checkpoint" / "trainer_state.pt")
    record_checksums(run / "checkpoint")
    return ["train", "--out", str(run), "--resume", "--train.steps=4"]


def _other_d_model(run: Path, tmp: Path) -> list[str]:
    cfg = json.loads((run / "checkpoint" / "config.json").read_text())
    cfg["model"]["d_model"] = 48
    _rewrite(run, "config.json", json.dumps(cfg).encode())
    return ["sample", "--ckpt", str(run), "--prompt", "To be"]


def _other_vocabulary(run: Path, tmp: Path) -> list[str]:
    from attnres.storage.tokenizer import train_bpe

    train_bpe(["to be or not to be, that is the question"] * 50, 300).save(tmp / "tokenizer.json")
    _rewrite(run, "tokenizer.json", (tmp / "tokenizer.json").read_bytes())
    return ["sample", "--ckpt", str(run), "--prompt", "To be"]


def _hf_folder_sampled(run: Path, tmp: Path) -> list[str]:
    pytest.importorskip("transformers")
    main(["convert", "--to-hf", str(run), str(tmp / "hf")])
    return ["sample", "--ckpt", str(tmp / "hf"), "--prompt", "To be"]


def _from_hf_resumed(run: Path, tmp: Path) -> list[str]:
    pytest.importorskip("transformers")
    main(["convert", "--to-hf", str(run), str(tmp / "hf")])
    main(["convert", "--from-hf", str(tmp / "hf"), str(tmp / "back")])
    return ["train", "--out", str(tmp / "back"), "--resume", "--train.steps=4"]


def _hf_folder_with_a_pickle(run: Path, tmp: Path) -> list[str]:
    pytest.importorskip("transformers")
    main(["convert", "--to-hf", str(run), str(tmp / "hf")])
    (tmp / "hf" / "model.safetensors").unlink()
    torch.save({"payload": _RunsCode(tmp / "pwned")}, tmp / "hf" / "pytorch_model.bin")
    return ["convert", "--from-hf", str(tmp / "hf"), str(tmp / "back")]


CHECKPOINT_CASES = [
    pytest.param(
        _truncated_state, "trainer_state.pt is corrupted or truncated", id="truncated-trainer-state"
    ),
    pytest.param(_random_state, "trainer_state.pt is corrupted or truncated", id="random-trainer-state"),
    pytest.param(_state_of_another_kind, "is not an attnres trainer state", id="trainer-state-lacks-keys"),
    pytest.param(_other_d_model, r"does not fit .*config.json \(model.d_model=48", id="config-other-d_model"),
    pytest.param(
        _other_vocabulary, r"has \d+ tokens but the model was trained on 257", id="tokenizer-other-vocab"
    ),
    pytest.param(_hf_folder_sampled, "is a Hugging Face transformers folder", id="sample-on-hf-folder"),
    pytest.param(_hf_folder_with_a_pickle, "holds no model.safetensors", id="from-hf-pickled-weights"),
    pytest.param(_from_hf_resumed, "holds weights only .*convert --from-hf", id="from-hf-resumed"),
]


@pytest.mark.parametrize(("damage", "message"), CHECKPOINT_CASES)
def test_a_damaged_or_foreign_checkpoint_is_one_clear_line(
    tmp_path, cache_dir, capsys, damage, message
) -> None:
    run = tmp_path / "run"
    train(_tiny(cache_dir, steps=2), run, log=_quiet)
    argv = damage(run, tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "error:" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err
    assert not (tmp_path / "pwned").exists()
