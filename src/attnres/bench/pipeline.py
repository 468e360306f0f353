"""``attnres bench pipeline``: bytes on the wire per pipeline transition, with and without caching.

Runs one training step per cache mode on ``pp`` local CPU processes (gloo), checks the loss and
every gradient against the single-process model first (no table for a wrong pipeline), then prints
the measured communication beside SPEC §6's Eq. 7/8 and the exact count for the layout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections import Counter
from dataclasses import asdict
from typing import Any

import torch

from attnres.distributed.accounting import (
    blocks_per_chunk,
    eq7_naive,
    eq8_cached,
    expected_blocks,
)
from attnres.distributed.check import PipelineCase, check_pipeline
from attnres.distributed.pipeline import CACHE_MODES, PipelineLayout

#: fp32 pipeline vs the same micro-batches in one process: the forward is identical and only the
#: order of gradient sums differs
GRAD_TOL = 1e-5


def run_pipeline_bench(
    pp: int = 2,
    vpp: int = 2,
    variant: str = "block",
    n_layers: int = 8,
    block_size: int | None = 2,
    microbatches: int = 4,
    microbatch_size: int = 2,
    seq_len: int = 32,
    d_model: int = 64,
) -> dict[str, Any]:
    """Measure one step per cache mode; return per-transition and total counts with the predictions."""
    base = PipelineCase(
        variant=variant,
        block_size=None if variant == "full" else block_size,
        n_layers=n_layers,
        pp=pp,
        vpp=vpp,
        microbatches=microbatches,
        microbatch_size=microbatch_size,
        seq_len=seq_len,
        d_model=d_model,
        vocab_size=256,
        dtype="float32",
    )
    cases = [PipelineCase(**{**asdict(base), "cache": mode}) for mode in CACHE_MODES]
    start = time.perf_counter()
    results = check_pipeline(cases)
    wall = time.perf_counter() - start
    for case, r in zip(cases, results, strict=True):
        if r["max_grad_err"] > GRAD_TOL or r["loss_err"] > GRAD_TOL:
            raise RuntimeError(
                f"pipeline with cache={case.cache} does not match the single-process model "
                f"(loss err {r['loss_err']:.2e}, max grad err {r['max_grad_err']:.2e}); not reporting bytes"
            )
    layout = PipelineLayout(**results[0]["layout"])
    n_p = blocks_per_chunk(layout)
    tokens = microbatch_size * seq_len
    modes: dict[str, Any] = {}
    for case, r in zip(cases, results, strict=True):
        counted = ("bytes", "elements", "blocks", "tensors")
        per = {d: {what: Counter() for what in counted} for d in ("fwd", "bwd")}
        for rec in r["records"]:
            for what in counted:
                per[rec["direction"]][what][rec["transition"]] += rec[what]
        modes[case.cache] = {
            "transitions": [
                {
                    "j": j,
                    "link": f"{layout.rank_of(j - 1)}->{layout.rank_of(j)}",
                    "blocks_per_token": per["fwd"]["blocks"][j] / microbatches,
                    "expected_blocks_per_token": expected_blocks(layout, case.cache)[j],
                    "fwd_elements": per["fwd"]["elements"][j],
                    "bwd_elements": per["bwd"]["elements"][j],
                    "fwd_bytes": per["fwd"]["bytes"][j],
                    "bwd_bytes": per["bwd"]["bytes"][j],
                }
                for j in range(1, layout.n_chunks)
            ],
            "blocks_per_token": sum(per["fwd"]["blocks"].values()) / microbatches,
            "fwd_elements": sum(per["fwd"]["elements"].values()),
            "bwd_elements": sum(per["bwd"]["elements"].values()),
            "fwd_bytes": sum(per["fwd"]["bytes"].values()),
            "bwd_bytes": sum(per["bwd"]["bytes"].values()),
            "block_bytes": sum(per["fwd"]["blocks"].values()) * tokens * d_model * 4,
            "max_grad_err": r["max_grad_err"],
            "loss": r["loss"],
        }
    return {
        "bench": "pipeline",
        "pp": pp,
        "vpp": vpp,
        "variant": variant,
        "n_sublayers": 2 * n_layers,
        "block_size": 1 if variant == "full" else block_size,
        "bounds": list(layout.bounds),
        "blocks_out": list(layout.blocks_out),
        "n_p": n_p,
        "microbatches": microbatches,
        "microbatch_tokens": tokens,
        "d_model": d_model,
        "dtype": "float32",
        "eq7_blocks_per_token": eq7_naive(pp, vpp, n_p),
        "eq8_blocks_per_token": eq8_cached(pp, vpp, n_p),
        # "seen" never returns a rank its own blocks: N_p fewer on each of the (V-1)·P later links
        "seen_blocks_per_token": eq8_cached(pp, vpp, n_p) - (vpp - 1) * pp * n_p,
        "modes": modes,
        "wall_s": round(wall, 2),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}",
    }


def format_table(res: dict[str, Any]) -> str:
    """The human table: per transition, blocks per token and bytes per step, for each cache mode."""
    scale = res["microbatches"] * res["microbatch_tokens"] * res["d_model"] * 4  # bytes per block per token
    lines = [
        f"pipeline P={res['pp']} V={res['vpp']} ({res['pp'] * res['vpp']} chunks), {res['variant']} AttnRes, "
        f"L={res['n_sublayers']} sublayers, S={res['block_size']}, "
        f"bounds {res['bounds']}, N_p={res['n_p']:g}",
        f"{res['microbatches']} micro-batches x {res['microbatch_tokens']} tokens, d={res['d_model']}, fp32; "
        f"one block over one link in one step = {scale} bytes",
        "",
        "blocks per token sent over each link (measured / expected), plus 1 partial per link",
        f"{'j':>3} {'link':>5} " + " ".join(f"{m:>12}" for m in res["modes"]),
    ]
    for i, row in enumerate(res["modes"]["off"]["transitions"]):
        cells = []
        for mode in res["modes"].values():
            t = mode["transitions"][i]
            cells.append(f"{t['blocks_per_token']:>6g} / {t['expected_blocks_per_token']:<3g}")
        lines.append(f"{row['j']:>3} {row['link']:>5} " + " ".join(f"{c:>12}" for c in cells))
    lines += [
        "",
        "traffic over each link in one step (blocks and partial), forward and backward",
        f"{'cache':>9} {'j':>3} {'link':>5} {'fwd elements':>13} {'fwd bytes':>10} "
        f"{'bwd elements':>13} {'bwd bytes':>10}",
    ]
    for name, mode in res["modes"].items():
        for t in mode["transitions"]:
            lines.append(
                f"{name:>9} {t['j']:>3} {t['link']:>5} {t['fwd_elements']:>13} {t['fwd_bytes']:>10} "
                f"{t['bwd_elements']:>13} {t['bwd_bytes']:>10}"
            )
    lines += [
        "",
        "totals per step; formula = blocks per token predicted for aligned blocks (N_p per chunk);",
        "predicted bytes = (formula + one partial per link) x bytes per block per token",
        f"{'cache':>9} {'blocks/token':>12} {'formula':>22} {'block bytes':>12} {'fwd elements':>13} "
        f"{'fwd bytes':>10} {'predicted':>10} {'bwd bytes':>10}",
    ]
    formulas = {
        "off": ("Eq.7", res["eq7_blocks_per_token"]),
        "received": ("Eq.8", res["eq8_blocks_per_token"]),
        "seen": ("Eq.8-(V-1)P*N_p", res["seen_blocks_per_token"]),
    }
    links = res["pp"] * res["vpp"] - 1
    for name, mode in res["modes"].items():
        label, value = formulas[name]
        formula = f"{label} = {value:g}"
        lines.append(
            f"{name:>9} {mode['blocks_per_token']:>12g} {formula:>22} {mode['block_bytes']:>12} "
            f"{mode['fwd_elements']:>13} {mode['fwd_bytes']:>10} {round((value + links) * scale):>10} "
            f"{mode['bwd_bytes']:>10}"
        )
    off = res["modes"]["off"]["fwd_bytes"]
    lines.append(
        "fwd bytes vs off: "
        + ", ".join(f"{n} {m['fwd_bytes'] / off:.3f}" for n, m in res["modes"].items())
        + f"   (wall {res['wall_s']} s, torch {res['torch']}, {res['machine']})"
    )
    return "\n".join(lines)


def _main(args: argparse.Namespace) -> None:
    res = run_pipeline_bench(
        pp=args.pp,
        vpp=args.vpp,
        variant=args.variant,
        n_layers=args.n_layers,
        block_size=args.block_size,
        microbatches=args.microbatches,
        microbatch_size=args.microbatch_size,
        seq_len=args.seq_len,
        d_model=args.d_model,
    )
    print(format_table(res))
    if args.json:
        print(json.dumps(res))


def register_pipeline_bench(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``pipeline`` to a ``bench`` sub-command's subparsers; the handler is ``args.func(args)``."""
    p = subparsers.add_parser("pipeline", help="pipeline communication with and without AttnRes caching")
    p.add_argument("--pp", type=int, default=2, help="physical stages (processes)")
    p.add_argument("--vpp", type=int, default=2, help="virtual stages per process")
    p.add_argument("--variant", choices=["block", "full"], default="block")
    p.add_argument("--n-layers", type=int, default=8, help="Transformer layers (2 sublayers each)")
    p.add_argument("--block-size", type=int, default=2, help="Block AttnRes block size in sublayers")
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--microbatch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--json", action="store_true", help="end stdout with one JSON line")
    p.set_defaults(func=_main)
    return p


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m attnres.bench.pipeline")
    register_pipeline_bench(parser.add_subparsers(required=True))
    parsed = parser.parse_args()
    parsed.func(parsed)
