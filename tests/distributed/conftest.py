"""Helpers for the tests that run ``attnres train`` in subprocesses, under torchrun or alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnres.distributed.launch import free_port

SRC = str(Path(__file__).resolve().parents[2] / "src")


class TrainCLI:
    """``attnres train --preset tiny`` on a small text corpus, in a subprocess."""

    def __init__(self, text: Path, cache: Path) -> None:
        self.text, self.cache = text, cache

    def __call__(self, out: Path, nproc: int, *flags: str) -> None:
        """Train into ``out``; ``nproc > 1`` launches under torchrun. Fails with the run's output."""
        args = [
            "-m", "attnres", "train", "--preset", "tiny", "--out", str(out),
            "--data.corpus=text", f"--data.path={self.text}", f"--data.cache_dir={self.cache}",
            "--train.eval_tokens=256", "--train.threads=1", "--train.device=cpu", *flags,
        ]  # fmt: skip
        if nproc > 1:
            launcher = ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1"]
            args = [*launcher, f"--master-port={free_port()}", *args]
        env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
        env["OMP_NUM_THREADS"] = "1"  # the processes share 2 cores
        proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    @staticmethod
    def losses(run: Path, key: str = "loss") -> list[float]:
        """``key`` (``loss``, ``val_loss``) of every step in ``run/metrics.jsonl`` that logged it."""
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [r[key] for r in records if key in r]


@pytest.fixture(scope="session")
def train_cli(tmp_path_factory: pytest.TempPathFactory) -> TrainCLI:
    """One seeded corpus (and token cache) for every run of the session."""
    root = tmp_path_factory.mktemp("corpus")
    g = torch.Generator().manual_seed(0)
    words = ["to", "be", "or", "not", "that", "is", "the", "question", "whether", "tis", "nobler"]
    idx = torch.randint(0, len(words), (6000,), generator=g).tolist()
    (root / "text.txt").write_text(" ".join(words[i] for i in idx))
    return TrainCLI(root / "text.txt", root / "cache")
