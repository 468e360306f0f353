"""``torchrun --nproc-per-node=2 -m attnres train`` against one process with the same global batch.

Every rank draws the step's global batch and trains on its half, so the two runs see the same
tokens. fp32 and AdamW: losses within 1e-5 relative, weights within 1e-5 absolute (see
test_data_parallel for why Adam turns ~1e-7 gradient differences into ~1e-6 weight differences).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from attnres.distributed.launch import free_port

pytestmark = pytest.mark.distributed
SRC = str(Path(__file__).resolve().parents[2] / "src")


def _train(out: Path, text: Path, cache: Path, nproc: int, *extra: str) -> None:
    args = [
        "-m", "attnres", "train", "--preset", "tiny", "--out", str(out),
        "--data.corpus=text", f"--data.path={text}", f"--data.cache_dir={cache}",
        "--train.steps=4", "--train.eval_every=2", "--train.eval_tokens=256", "--train.threads=1",
        "--train.device=cpu", *extra,
    ]  # fmt: skip
    if nproc > 1:
        launcher = ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1"]
        args = [*launcher, f"--master-port={free_port()}", *args]
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("corpus")
    g = torch.Generator().manual_seed(0)
    words = ["to", "be", "or", "not", "that", "is", "the", "question", "whether", "tis", "nobler"]
    idx = torch.randint(0, len(words), (6000,), generator=g).tolist()
    (root / "text.txt").write_text(" ".join(words[i] for i in idx))
    return root / "text.txt", root / "cache"


@pytest.mark.parametrize("dp_shard", [False, True], ids=["ddp", "fsdp2"])
def test_torchrun_matches_one_process_and_resumes_on_one(
    dp_shard: bool, corpus: tuple[Path, Path], tmp_path: Path
) -> None:
    text, cache = corpus
    shard = f"--parallel.dp_shard={str(dp_shard).lower()}"
    _train(tmp_path / "one", text, cache, 1)
    _train(tmp_path / "two", text, cache, 2, shard)
    torch.testing.assert_close(
        torch.tensor(_losses(tmp_path / "two")), torch.tensor(_losses(tmp_path / "one")), rtol=1e-5, atol=0
    )
    one = load_file(tmp_path / "one" / "checkpoint" / "model.safetensors")
    two = load_file(tmp_path / "two" / "checkpoint" / "model.safetensors")
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-5)
    # only rank 0 wrote: one metrics line per step, one checkpoint
    assert len(_losses(tmp_path / "two")) == 4
    # the 2-process checkpoint resumes in one process, and the 1-process one under torchrun (DDP:
    # a checkpoint written without FSDP2 has per-parameter optimiser state FSDP2 refuses to load)
    _train(tmp_path / "two", text, cache, 1, "--resume", "--train.steps=6", "--parallel.dp_shard=false")
    _train(tmp_path / "one", text, cache, 2, "--resume", "--train.steps=6")
    torch.testing.assert_close(
        torch.tensor(_losses(tmp_path / "two")), torch.tensor(_losses(tmp_path / "one")), rtol=1e-5, atol=0
    )
