"""Pipeline parity and byte counts against the single-process model, on local gloo processes.

:func:`check_pipeline` spawns ``pp`` CPU processes, runs one training step of each case through
:class:`PipelineRunner`, and compares the loss and every parameter gradient with the same model run
in one process on the same batch. Tests and ``attnres bench pipeline`` both use it, so a benchmark
never reports byte counts of a pipeline whose gradients are wrong.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from attnres.distributed.launch import spawn_gloo
from attnres.distributed.pipeline import CommRecord, PipelineRunner, split_model
from attnres.distributed.pipeline_train import assemble, chunk_pieces
from attnres.model import ModelConfig, Transformer, lm_loss
from attnres.residuals import ResidualConfig


@dataclass(frozen=True)
class PipelineCase:
    """One pipeline configuration to check; small by default so a case runs in well under a second."""

    variant: str = "block"
    block_size: int | None = 2
    n_layers: int = 4
    pp: int = 2
    vpp: int = 1
    cache: str = "seen"
    microbatches: int = 2
    microbatch_size: int = 2
    seq_len: int = 7
    d_model: int = 32
    vocab_size: int = 99
    dtype: str = "float64"
    bounds: tuple[int, ...] | None = None
    seed: int = 0


def build_model(case: PipelineCase) -> Transformer:
    """The case's model with random (not zero) pseudo-queries, so depth reads are not uniform."""
    torch.manual_seed(case.seed)
    cfg = ModelConfig(
        vocab_size=case.vocab_size,
        d_model=case.d_model,
        n_layers=case.n_layers,
        n_heads=4,
        seq_len=case.seq_len,
        residual=ResidualConfig.for_variant(case.variant, block_size=case.block_size),
    )
    model = Transformer(cfg).to(getattr(torch, case.dtype))
    with torch.no_grad():
        for name, p in model.residual.named_parameters():
            p.add_(torch.randn_like(p) * (1.0 if name == "query" else 0.1))
    return model


def case_batch(case: PipelineCase) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and next-token targets ``[M * mb, T]`` (seeded; the same on every rank)."""
    g = torch.Generator().manual_seed(case.seed + 1)
    B = case.microbatches * case.microbatch_size
    seq = torch.randint(0, case.vocab_size, (B, case.seq_len + 1), generator=g)
    return seq[:, :-1], seq[:, 1:]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def run_case(rank: int, case: PipelineCase) -> dict[str, Any] | None:
    """Collective: one pipelined step of ``case``; on rank 0, the comparison with one process."""
    model = build_model(case)
    tokens, targets = case_batch(case)
    layout, chunks = split_model(model, case.pp, case.vpp, rank=rank, bounds=case.bounds)
    runner = PipelineRunner(chunks, layout, cache=case.cache)
    loss, stats = runner.step(tokens, targets, case.microbatches)
    gathered: list[Any] = [None] * case.pp
    dist.all_gather_object(gathered, (chunk_pieces(chunks, "grad"), stats.records))
    if rank != 0:
        return None

    # Reference 1: the same micro-batches accumulated in one process. The forward is then
    # bitwise the pipeline's; only the order of gradient sums differs.
    ref_loss = 0.0
    for tok, tgt in zip(tokens.chunk(case.microbatches), targets.chunk(case.microbatches), strict=True):
        loss_m = lm_loss(model(tok), tgt) / case.microbatches
        loss_m.backward()
        ref_loss += float(loss_m.detach())
    ref = dict(model.named_parameters())
    accumulated = {name: p.grad.clone() for name, p in ref.items()}
    # Reference 2: the whole batch in one forward, the plain single-process step.
    model.zero_grad()
    batch_loss = lm_loss(model(tokens), targets)
    batch_loss.backward()
    assembled = assemble(ref, [piece for rank_grads, _ in gathered for piece in rank_grads])  # a partition
    grad_err = {name: _rel_err(assembled[name], accumulated[name]) for name in ref}
    batch_grad_err = {name: _rel_err(assembled[name], p.grad) for name, p in ref.items()}
    records: list[CommRecord] = [r for _, rank_records in gathered for r in rank_records]
    return {
        "case": asdict(case),
        "layout": asdict(layout),
        "loss": loss,
        "ref_loss": ref_loss,
        "loss_err": abs(loss - ref_loss),
        "grad_err": grad_err,
        "max_grad_err": max(grad_err.values()),
        "batch_loss_err": abs(loss - float(batch_loss.detach())),
        "max_batch_grad_err": max(batch_grad_err.values()),
        "records": [asdict(r) for r in records],
    }


def _worker(rank: int, world_size: int, cases: list[PipelineCase], out: str) -> None:
    batch_isend_irecv, sends = dist.batch_isend_irecv, [0]

    def contiguous_batch(ops: list[dist.P2POp]) -> Any:
        # gloo reads the raw buffer, so a non-contiguous tensor would arrive scrambled
        for op in ops:
            if op.op is dist.isend:
                if not op.tensor.is_contiguous():
                    raise ValueError(f"non-contiguous tensor {tuple(op.tensor.shape)} handed to gloo isend")
                sends[0] += 1
        return batch_isend_irecv(ops)

    dist.batch_isend_irecv = contiguous_batch  # this process only: it was spawned for the check
    results = []
    for case in cases:
        sends[0] = 0
        result = run_case(rank, case)
        counts: list[Any] = [None] * world_size
        dist.all_gather_object(counts, sends[0])
        if result is not None:
            result["sends"] = sum(counts)
        results.append(result)
    if rank == 0:
        torch.save(results, out)


def check_pipeline(cases: list[PipelineCase]) -> list[dict[str, Any]]:
    """Run ``cases`` (all with the same ``pp``) on ``pp`` local gloo processes; rank 0's results."""
    pps = {case.pp for case in cases}
    if len(pps) != 1:
        raise ValueError(f"one call runs one process count; got pp values {sorted(pps)}")
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "results.pt")
        spawn_gloo(_worker, pps.pop(), cases, out)
        return torch.load(out, weights_only=True)  # plain results: floats, tensors, strings
