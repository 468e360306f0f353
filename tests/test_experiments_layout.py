"""experiments/: what git keeps of a run is enough to resume a compare and to regenerate its report."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from attnres.analysis.report import write_report
from attnres.cli import main
from attnres.configs import apply_overrides, from_dict
from attnres.train import TrainConfig, get_preset
from attnres.train.compare import compare

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"


def _git_ignores(paths: list[str]) -> set[str]:
    """The repo-relative ``paths`` that the repository's .gitignore ignores (checked by git itself)."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs git and a git checkout")
    proc = subprocess.run(
        ["git", "check-ignore", "--no-index", "--stdin"],
        input="\n".join(paths),
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    return set(proc.stdout.split())


def test_git_keeps_the_results_of_an_experiment_and_drops_its_checkpoints(tmp_path, cache_dir):
    """Train a 2-run compare, keep only what git would commit under experiments/, and compare again:
    nothing retrains, and ``attnres report`` works on the kept files alone."""
    cfg = apply_overrides(get_preset("tiny"), {"data.cache_dir": cache_dir, "train.steps": "3"})
    trained = tmp_path / "trained" / "runs"
    first = compare(cfg, ["prenorm", "block"], 1, trained, log=lambda _: None)
    files = sorted(p.relative_to(trained).as_posix() for p in trained.rglob("*") if p.is_file())
    as_committed = {f: f"experiments/demo/runs/{f}" for f in files}
    ignored = _git_ignores(list(as_committed.values()))
    kept = [f for f, path in as_committed.items() if path not in ignored]
    assert any(f.startswith("prenorm-s0/checkpoint/") for f in files)
    assert not any("checkpoint" in f or f.endswith(".lock") or f == "summary.json" for f in kept)
    for name in ("config.json", "run_info.json", "metrics.jsonl", "result.json", "diagnostics.json"):
        assert f"block-s0/{name}" in kept, name
    clone = tmp_path / "clone"
    for f in kept:
        (clone / "runs" / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(trained / f, clone / "runs" / f)
    lines: list[str] = []
    again = compare(cfg, ["prenorm", "block"], 1, clone / "runs", log=lines.append)
    assert sum("finished earlier, reusing its result" in line for line in lines) == 2
    assert [r.final_val_loss for r in again] == [r.final_val_loss for r in first]
    assert not (clone / "runs" / "prenorm-s0" / "checkpoint").exists()  # nothing retrained
    text = write_report(clone).read_text()
    assert "| block | 1 |" in text and "![loss curves](loss_curves.png)" in text


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*/settings/*.json")), ids=lambda p: p.stem)
def test_committed_experiment_settings_are_complete_valid_configs(path: Path, capsys):
    """Each setting file is a whole config (so a later change of a preset cannot change it), and
    ``attnres compare --config FILE`` resolves it to exactly what the file says."""
    data = json.loads(path.read_text())
    cfg = from_dict(TrainConfig, data)
    assert cfg.train.device == "cpu" and cfg.train.threads == 1  # the same numbers on every machine
    main(["compare", "--config", str(path), "--print-config", "--out", "unused"])
    printed = json.loads(capsys.readouterr().out)
    assert printed == data
