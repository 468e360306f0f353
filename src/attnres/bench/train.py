"""``attnres bench train``: one training step of the reference LM per variant, vs PreNorm.

Every arm builds its model from the same seed and trains on the same batch with AdamW. Arms run
interleaved, ``repeats`` times, and the median is reported. AttnRes variants run once per
depth-read implementation in ``--impls`` (``reference`` is the "before", ``auto`` the "after"),
and every arm once per ``--precisions`` entry (``train.precision`` names: autocast around forward and
loss for ``*-mixed``, the model cast for ``bf16-true``; an arm's ratios are to the prenorm of its
precision).

Memory is the bytes saved for backward by one training forward (unique storages) plus parameters,
gradients and AdamW state (4 × parameters): the CPU allocator has no peak counter.

``--compile`` runs every arm's forward (and so its backward) under ``torch.compile`` (inductor, the
depth reads on the same kernels as eager, inside the graph), ratios then being compiled against
compiled prenorm; the warm-up call compiles (not timed), and memory is measured eagerly.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor

import torch

from attnres.bench.measure import interleaved_medians, machine, saved_bytes
from attnres.model import ModelConfig, Transformer, lm_loss
from attnres.model.compile import allow_graphs, check_compile_supported
from attnres.ops.dispatch import use_impl
from attnres.residuals import ResidualConfig, variant_names
from attnres.train.precision import Precision, check_precision_supported

SIZES = {
    "tiny": dict(d_model=32, n_layers=2, n_heads=4, seq_len=16, batch=2),  # smoke tests
    "small": dict(d_model=128, n_layers=8, n_heads=4, seq_len=256, batch=8),
    "reference": dict(d_model=512, n_layers=8, n_heads=8, seq_len=512, batch=4),
}
ATTNRES = ("block", "full")


def run(args: argparse.Namespace) -> dict:
    """Measure every (variant, impl) arm; returns the JSON-ready result.

    With ``--pairwise`` each variant is measured beside a fresh prenorm in a fresh process, one pair
    at a time, so only two models are alive at once and every pair starts from an empty heap (all
    eleven variants at the reference size do not fit in 24 GiB together, and one process running
    the pairs in turn ran out of memory at the tenth); ratios are always to the prenorm of the same
    pair.
    """
    variants = variant_names() if args.variants == "all" else args.variants.split(",")
    variants = [v for v in variants if v != "prenorm"]
    size = SIZES[args.size]
    precisions = args.precisions.split(",")
    for precision in precisions:
        check_precision_supported(precision, torch.device("cpu"))
    if args.compile:
        check_compile_supported("cpu")
    if not args.pairwise:
        rows = _measure(
            ["prenorm", *variants], size, args.impls.split(","), args.repeats, precisions, args.compile
        )
    else:
        rows = []
        spawn = multiprocessing.get_context("spawn")
        for i, variant in enumerate(variants):
            print(f"[{i + 1}/{len(variants)}] {variant} beside prenorm", file=sys.stderr, flush=True)
            with ProcessPoolExecutor(1, mp_context=spawn) as pool:
                job = (
                    ["prenorm", variant],
                    size,
                    args.impls.split(","),
                    args.repeats,
                    precisions,
                    torch.get_num_threads(),
                    args.compile,
                )
                pair = pool.submit(_measure_in_child, *job).result()
            for r in pair[1:]:
                print(f"    {r['arm']}: step {r['ratio_vs_prenorm']:.3f}x, memory {r['memory_ratio']:.3f}x",
                      file=sys.stderr, flush=True)  # fmt: skip
            rows += pair if i == 0 else pair[1:]
    return {"bench": "train", "size": args.size, "shape": size, "repeats": args.repeats,
            "precisions": precisions, "pairwise": args.pairwise, "compile": args.compile, "rows": rows,
            "machine": machine()}  # fmt: skip


def _measure_in_child(
    variants: list[str],
    size: dict,
    impls: list[str],
    repeats: int,
    precisions: list[str],
    threads: int,
    compile: bool,
) -> list[dict]:
    torch.set_num_threads(threads)
    return _measure(variants, size, impls, repeats, precisions, compile)


def _measure(
    variants: list[str],
    size: dict,
    impls: list[str],
    repeats: int,
    precisions: list[str],
    compile: bool = False,
) -> list[dict]:
    """Rows for ``variants`` (the first is the baseline) × ``precisions``, all arms interleaved in one run.

    ``compile``: each arm's model under ``torch.compile``. All arms' graphs belong to one code object
    (``Transformer.forward``), two per arm (training and the no-grad forward), so the recompile limit
    is raised to fit them: past it, dynamo would silently run the later arms eagerly.
    """
    if compile:
        allow_graphs(2 * len(precisions) * sum(len(impls) if v in ATTNRES else 1 for v in variants) + 2)
    batch = size["batch"]
    model_kw = {k: v for k, v in size.items() if k != "batch"}
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (batch, size["seq_len"] + 1), generator=gen)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    arms, fwd_arms, memory, base_of = {}, {}, {}, {}
    for precision in precisions:
        prec = Precision(precision, torch.device("cpu"))
        suffix = "" if len(precisions) == 1 else f" {precision}"
        for variant in variants:
            for impl in impls if variant in ATTNRES else ["-"]:
                name = (variant if impl == "-" else f"{variant}[{impl}]") + suffix
                base_of[name] = variants[0] + suffix
                torch.manual_seed(0)
                model = Transformer(ModelConfig(vocab_size=256, residual=ResidualConfig(variant), **model_kw))
                model = prec.prepare(model)
                opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
                mode = "auto" if impl == "-" else impl  # other variants read as they do by default
                run_model = torch.compile(model) if compile else model

                def step(model=run_model, opt=opt, mode=mode, prec=prec) -> None:
                    with use_impl(mode), prec.autocast():
                        loss = lm_loss(model(inputs), targets)
                    prec.backward(loss)
                    opt.step()  # no clipping here, so the scaler's unscale-before-step is not needed
                    opt.zero_grad(set_to_none=True)

                def forward(model=run_model, mode=mode, prec=prec) -> None:
                    with torch.no_grad(), use_impl(mode), prec.autocast():
                        model(inputs)

                arms[name], fwd_arms[name] = step, forward
                n_params = sum(p.numel() * p.element_size() for p in model.parameters())
                with saved_bytes() as saved, use_impl(mode), prec.autocast():
                    loss = lm_loss(model(inputs), targets)
                del loss
                memory[name] = (saved[0] + 4 * n_params) / 2**20

    step_ms = interleaved_medians(arms, repeats)
    fwd_ms = interleaved_medians(fwd_arms, repeats)
    return [
        {
            "arm": name,
            "step_ms": step_ms[name],
            "ratio_vs_prenorm": step_ms[name] / step_ms[base_of[name]],
            "forward_ms": fwd_ms[name],
            "forward_ratio": fwd_ms[name] / fwd_ms[base_of[name]],
            "memory_mb": memory[name],
            "memory_ratio": memory[name] / memory[base_of[name]],
        }
        for name in arms
    ]


def table(result: dict) -> str:
    """Human-readable table of :func:`run`'s result."""
    width = max(20, *(len(r["arm"]) for r in result["rows"]))
    head = f"{'arm':<{width}} {'step ms':>9} {'x prenorm':>9} {'fwd ms':>9} {'fwd x':>7} {'mem MB':>8}"
    head += f" {'mem x':>6}"
    compiled = ", torch.compile" if result.get("compile") else ""
    lines = [
        f"bench train, size {result['size']} {result['shape']}, median of {result['repeats']}{compiled}",
        head,
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['arm']:<{width}} {r['step_ms']:9.1f} {r['ratio_vs_prenorm']:9.3f} {r['forward_ms']:9.1f} "
            f"{r['forward_ratio']:7.3f} {r['memory_mb']:8.1f} {r['memory_ratio']:6.3f}"
        )
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``attnres bench train`` flags."""
    p.add_argument("--variants", default="prenorm,block,full", help="comma-separated names, or 'all'")
    p.add_argument("--size", choices=tuple(SIZES), default="small")
    p.add_argument(
        "--impls", default="reference,auto", help="depth-read implementations for AttnRes variants"
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--precisions",
        default="fp32",
        help="comma-separated train.precision values, each arm timed in each: fp32, bf16-mixed, fp16-mixed, "
        "bf16-true",
    )
    p.add_argument(
        "--pairwise",
        action="store_true",
        help="measure each variant in its own run beside prenorm (bounded memory; use with --variants all)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile every arm (inductor; the warm-up step compiles, untimed); needs a C++ compiler",
    )
    p.add_argument("--json", action="store_true", help="end stdout with one JSON line")


def main(args: argparse.Namespace) -> None:
    """``attnres bench train``: the table on stdout; with ``--json`` one JSON line last."""
    result = run(args)
    print(table(result))
    if args.json:
        print(json.dumps(result))
