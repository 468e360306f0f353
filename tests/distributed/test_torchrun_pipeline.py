"""``torchrun --nproc-per-node=2 -m attnres train --parallel.pp=2`` against one process.

The same config and global batch, 3 AdamW steps (tiny preset: 4 sublayers, so vpp=2 puts one
sublayer in each of 4 chunks). Gradient clipping at 0.05 binds, so the update depends on the
all-reduce of the global gradient norm across stages (without it, these tests fail).

Tolerance (fp32): losses within 1e-5 relative, weights within 1e-5 absolute, as for DDP. The
pipeline reduces in a different order: the loss is a mean of micro-batch means; gradients are
summed over micro-batches and, for a block read in several chunks, over those chunks' fused-read
``rstd`` (recomputed on arrival) one chunk at a time; the global norm adds per-rank squares. Those
are ~1e-7 relative differences, which Adam's division by ``sqrt(v)`` can turn into ~1e-6 absolute
weight differences (measured here: losses ≤ 9e-8 relative, weights ≤ 1.6e-7 absolute; 2.7e-6 on
Shakespeare with Block S=1).

Resume under the same layout repeats the uninterrupted run bitwise: the weights and the assembled
optimiser state round-trip exactly, and the data depend on the step alone. The constant schedule
keeps the learning rate independent of ``train.steps``, so a 2-step run continued to 3 is
comparable with a 3-step run. (Muon's chunk steps equal the single-process ones bitwise given the
same gradients: test_pipeline_train.)
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from attnres.storage.checkpoint import load_model

pytestmark = pytest.mark.distributed

COMMON = ("--train.eval_every=2", "--schedule.name=constant", "--optim.grad_clip=0.05")
BLOCK = ("--model.residual.variant=block", "--model.residual.block_size=2")
FULL = ("--model.residual.variant=full",)
PP2 = ("--parallel.pp=2",)
# name -> (processes, flags, the single-process run it must match)
RUNS = {
    "one-block": (1, BLOCK, None),
    "pp2-v1-block": (2, (*BLOCK, *PP2, "--parallel.vpp=1"), "one-block"),
    "pp2-v2-block": (2, (*BLOCK, *PP2, "--parallel.vpp=2"), "one-block"),
    "one-full": (1, FULL, None),
    "pp2-v2-full-nocache": (
        2,
        (*FULL, *PP2, "--parallel.vpp=2", "--parallel.attnres_cache=false", "--parallel.microbatches=4"),
        "one-full",
    ),
}
# Resume runs use Muon, whose bf16 Newton-Schulz step turns ~1e-7 gradient differences into
# occasional ~2e-4 weight differences (one bf16 rounding flipped), so Muon cannot be held to fp32
# parity with a single process; a resume under the same layout must still be bitwise.
MUON = (*BLOCK, *PP2, "--parallel.vpp=2", "--optim.name=muon")


@pytest.fixture(scope="module")
def runs(train_cli, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pp")
    for name, (nproc, flags, _) in RUNS.items():
        train_cli(root / name, nproc, "--train.steps=3", *COMMON, *flags)
    train_cli(root / "muon", 2, "--train.steps=3", *COMMON, *MUON)
    # interrupted after 2 steps, then continued under pp and in one process
    train_cli(root / "muon-resumed", 2, "--train.steps=2", *COMMON, *MUON)
    shutil.copytree(root / "muon-resumed", root / "muon-resumed-one")
    train_cli(root / "muon-resumed", 2, "--train.steps=3", *COMMON, *MUON, "--resume")
    train_cli(
        root / "muon-resumed-one", 1, "--train.steps=3", *COMMON, *BLOCK, "--optim.name=muon", "--resume"
    )
    return root


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoint" / "model.safetensors")


@pytest.mark.parametrize("name", [n for n, (_, _, ref) in RUNS.items() if ref])
def test_pipeline_training_matches_one_process(name: str, runs: Path, train_cli) -> None:
    reference = RUNS[name][2]
    got, want = train_cli.losses(runs / name), train_cli.losses(runs / reference)
    assert len(got) == 3  # rank 0 alone logs
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=0)
    val, want_val = train_cli.losses(runs / name, "val_loss"), train_cli.losses(runs / reference, "val_loss")
    assert len(val) == 2  # steps 2 and 3, forward only through the pipeline
    torch.testing.assert_close(torch.tensor(val), torch.tensor(want_val), rtol=1e-5, atol=0)
    pp, one = _weights(runs / name), _weights(runs / reference)
    assert pp.keys() == one.keys()  # the single-process checkpoint format
    for key in one:
        torch.testing.assert_close(pp[key], one[key], rtol=0, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
    assert got[-1] < got[0]  # not vacuous: the weights moved


def test_pipeline_resume_is_exact_and_loads_in_one_process(runs: Path, train_cli) -> None:
    straight, resumed = runs / "muon", runs / "muon-resumed"
    assert train_cli.losses(resumed) == train_cli.losses(straight)
    a, b = _weights(straight), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the pp checkpoint in one process: a plain model, and a run that resumes from it (step 3's
    # loss is the forward of the step-2 weights: fp32 parity)
    model, cfg = load_model(runs / "muon")
    assert (cfg.parallel.pp, cfg.parallel.vpp) == (2, 2)
    torch.testing.assert_close(model.embed.weight.detach(), a["embed.weight"], rtol=0, atol=0)
    torch.testing.assert_close(
        torch.tensor(train_cli.losses(runs / "muon-resumed-one")),
        torch.tensor(train_cli.losses(straight)),
        rtol=1e-5,
        atol=0,
    )


def test_pipeline_checkpoint_converts_to_hugging_face(runs: Path) -> None:
    convert = pytest.importorskip("attnres.hf.convert")  # the hf extra
    from transformers import AutoModelForCausalLM

    hf_dir = convert.to_hf(runs / "pp2-v2-block", runs / "hf")
    native, _ = load_model(runs / "pp2-v2-block")
    x = torch.randint(0, native.cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    assert torch.equal(AutoModelForCausalLM.from_pretrained(hf_dir)(x).logits, native.eval()(x))
