"""``attnres bench ops``: forward+backward of one depth read, fast paths vs the reference.

Per (N, d): one read over ``N`` sources of ``--tokens`` tokens, timed forward+backward (median of
interleaved repeats), and the bytes autograd saves for backward (unique storages, sources
included), for ``reference`` and ``fused``; ``two_phase`` is phase 1 for a group of 4 reads plus
3 merges, reported per read. On CPU the fast paths run the native kernels
(:mod:`attnres.ops.native`); the ``…[torch ops]`` arms are the same paths on PyTorch ops.
"""

from __future__ import annotations

import argparse

import torch

from attnres.bench.measure import emit, interleaved_medians, machine, saved_bytes
from attnres.ops.dispatch import use_kernels
from attnres.ops.fused import fused_depth_read, source_rstd
from attnres.ops.reference import depth_read
from attnres.ops.two_phase import phase1, phase2_merge

GROUP = 4


def _arms(n: int, d: int, tokens: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    sources = [torch.randn(tokens, d, generator=gen).requires_grad_() for _ in range(n)]
    q = (0.1 * torch.randn(GROUP, d, generator=gen)).requires_grad_()
    gain = torch.ones(GROUP, d, requires_grad=True)
    grad = torch.randn(tokens, d, generator=gen)

    def reference():
        depth_read(sources, q[0], gain[0]).backward(grad)

    def fused():
        fused_depth_read(sources, q[0], gain[0]).backward(grad)

    def two_phase():  # GROUP reads: the completed blocks are sources[:-1], the partial sources[-1]
        blocks = sources[:-1] or sources
        rstd = [source_rstd(b, 1e-6) for b in blocks]
        outs, lse = phase1(blocks, rstd, q, gain)
        r_p = source_rstd(sources[-1], 1e-6)
        total = outs[0].sum()
        for i in range(1, GROUP):
            total = total + phase2_merge(outs[i], lse[..., i], sources[-1], r_p, q[i], gain[i]).sum()
        total.backward()

    def on_torch_ops(fn):
        def run():
            with use_kernels("torch"):
                fn()

        return run

    return {
        "reference": reference,
        "fused": fused,
        "fused[torch ops]": on_torch_ops(fused),
        "two_phase": two_phase,
        "two_phase[torch ops]": on_torch_ops(two_phase),
    }


def run(args: argparse.Namespace) -> dict:
    """Measure every (N, d, impl); returns the JSON-ready result."""
    rows = []
    for d in map(int, args.d.split(",")):
        for n in map(int, args.n.split(",")):
            arms = _arms(n, d, args.tokens)
            ms = interleaved_medians(arms, args.repeats)
            for impl, fn in arms.items():
                with saved_bytes() as saved:
                    fn()
                per_read = GROUP if impl.startswith("two_phase") else 1
                rows.append({
                    "n": n, "d": d, "impl": impl, "ms_per_read": ms[impl] / per_read,
                    "speedup_vs_reference": ms["reference"] / (ms[impl] / per_read),
                    "saved_mb_per_read": saved[0] / per_read / 2**20,
                })  # fmt: skip
    return {
        "bench": "ops",
        "tokens": args.tokens,
        "repeats": args.repeats,
        "rows": rows,
        "machine": machine(),
    }


def table(result: dict) -> str:
    """Human-readable table of :func:`run`'s result."""
    lines = [
        f"bench ops, {result['tokens']} tokens, fwd+bwd per read, median of {result['repeats']}",
        f"{'N':>3} {'d':>5} {'impl':<20} {'ms/read':>9} {'speedup':>8} {'saved MB/read':>14}",
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['n']:>3} {r['d']:>5} {r['impl']:<20} {r['ms_per_read']:9.2f} "
            f"{r['speedup_vs_reference']:8.2f} {r['saved_mb_per_read']:14.2f}"
        )
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``attnres bench ops`` flags."""
    p.add_argument("--n", default="2,4,8,16,33", help="comma-separated source counts N")
    p.add_argument("--d", default="256,1024", help="comma-separated widths d")
    p.add_argument("--tokens", type=int, default=1024, help="tokens per read (batch × seq_len)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", action="store_true", help="end stdout with one JSON line")


def main(args: argparse.Namespace) -> None:
    """``attnres bench ops``: the table on stdout; with ``--json`` one JSON line last."""
    result = run(args)
    emit(table(result), result, args.json)
