"""Benchmarks: ``attnres bench ops`` (depth reads) and ``attnres bench train`` (one training step)."""

from __future__ import annotations

import argparse


def register_bench(subparsers: argparse._SubParsersAction) -> None:
    """Add ``bench ops`` and ``bench train`` to the ``attnres`` CLI (modules import lazily)."""
    bench = subparsers.add_parser("bench", help="benchmark depth reads or a training step")
    verbs = bench.add_subparsers(dest="bench_verb", required=True)

    p = verbs.add_parser("ops", help="depth-read implementations vs the reference, forward+backward")
    p.add_argument("--n", default="2,4,8,16,33", help="comma-separated source counts N")
    p.add_argument("--d", default="256,1024", help="comma-separated widths d")
    p.add_argument("--tokens", type=int, default=1024, help="tokens per read (batch × seq_len)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", action="store_true", help="end stdout with one JSON line")
    p.set_defaults(func=lambda args, extra: _run("ops", args))

    p = verbs.add_parser("train", help="one AdamW training step per variant vs prenorm")
    p.add_argument("--variants", default="prenorm,block,full", help="comma-separated names, or 'all'")
    p.add_argument("--size", choices=("small", "reference"), default="small")
    p.add_argument(
        "--impls", default="reference,auto", help="depth-read implementations for AttnRes variants"
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", action="store_true", help="end stdout with one JSON line")
    p.set_defaults(func=lambda args, extra: _run("train", args))


def _run(verb: str, args: argparse.Namespace) -> None:
    import importlib
    import json

    module = importlib.import_module(f"attnres.bench.{verb}")
    result = module.run(args)
    print(module.table(result))
    if args.json:
        print(json.dumps(result))
