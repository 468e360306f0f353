"""``torchrun --nproc-per-node=2 -m attnres train`` against one process with the same global batch.

Every rank draws the step's global batch and trains on its half, so the two runs see the same
tokens; under DDP each rank evaluates half the validation batches (here one of two). fp32 and
AdamW: training and validation losses within 1e-5 relative, weights within 1e-5 absolute (see
test_data_parallel for why Adam turns ~1e-7 gradient differences into ~1e-6 weight differences).
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.distributed
STEPS = ("--train.steps=4", "--train.eval_every=2")


@pytest.mark.parametrize("dp_shard", [False, True], ids=["ddp", "fsdp2"])
def test_torchrun_matches_one_process_and_resumes_on_one(dp_shard: bool, train_cli, tmp_path: Path) -> None:
    shard = f"--parallel.dp_shard={str(dp_shard).lower()}"
    train_cli(tmp_path / "one", 1, *STEPS)
    logger = ("--train.logger=tensorboard",) if importlib.util.find_spec("tensorboard") else ()
    train_cli(tmp_path / "two", 2, *STEPS, shard, *logger)
    if logger:  # rank 0 alone logs: one event file
        assert len(list((tmp_path / "two" / "tensorboard").glob("events.out.tfevents.*"))) == 1
    losses = train_cli.losses
    # DDP: each rank evaluates half the validation batches; the gradient norm is the global one
    for key in ("loss", "val_loss", "grad_norm"):
        torch.testing.assert_close(
            torch.tensor(losses(tmp_path / "two", key)),
            torch.tensor(losses(tmp_path / "one", key)),
            rtol=1e-5,
            atol=0,
        )
    one = load_file(tmp_path / "one" / "checkpoint" / "model.safetensors")
    two = load_file(tmp_path / "two" / "checkpoint" / "model.safetensors")
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-5)
    # only rank 0 wrote: one metrics line per step, one checkpoint
    assert len(losses(tmp_path / "two")) == 4
    # the 2-process checkpoint resumes in one process, and the 1-process one under torchrun (DDP:
    # a checkpoint written without FSDP2 has per-parameter optimiser state FSDP2 refuses to load)
    shutil.copytree(tmp_path / "two", tmp_path / "two-pp")
    train_cli(tmp_path / "two", 1, *STEPS, "--resume", "--train.steps=6", "--parallel.dp_shard=false")
    # ... and under a pipeline, whose chunk optimisers take their rows of the saved state
    pipeline = ("--parallel.dp_shard=false", "--parallel.pp=2")
    train_cli(tmp_path / "two-pp", 2, *STEPS, "--resume", "--train.steps=6", *pipeline)
    for key in ("loss", "grad_norm"):  # the pipeline's norm is summed over its stages
        torch.testing.assert_close(
            torch.tensor(losses(tmp_path / "two-pp", key)),
            torch.tensor(losses(tmp_path / "two", key)),
            rtol=1e-5,
            atol=0,
        )
    train_cli(tmp_path / "one", 2, *STEPS, "--resume", "--train.steps=6")
    torch.testing.assert_close(
        torch.tensor(losses(tmp_path / "two")), torch.tensor(losses(tmp_path / "one")), rtol=1e-5, atol=0
    )


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_pipeline_trains_in_bf16_like_one_process(precision: str, train_cli, tmp_path: Path) -> None:
    """Under bf16 the stage messages keep the parameter dtype (fp32 stream under autocast, bf16 for
    bf16-true), so a 2-stage pipeline runs and tracks the one-process run; micro-batches change the
    order of the loss reduction and the bf16 matmul shapes, hence the bf16-sized tolerance."""
    flags = (*STEPS, f"--train.precision={precision}", "--model.residual.variant=block")
    train_cli(tmp_path / "one", 1, *flags)
    train_cli(tmp_path / "pp", 2, *flags, "--parallel.pp=2")
    for key in ("loss", "val_loss"):
        torch.testing.assert_close(
            torch.tensor(train_cli.losses(tmp_path / "pp", key)),
            torch.tensor(train_cli.losses(tmp_path / "one", key)),
            rtol=2e-2,
            atol=0,
        )
