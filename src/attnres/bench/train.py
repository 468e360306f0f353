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
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor

import torch

from attnres.bench.measure import emit, interleaved_medians, machine, saved_bytes
from attnres.bench.peer import Peer, PeerSpec, parse_overrides
from attnres.bench.peer import load as load_peer
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
VOCAB = 256


def run(args: argparse.Namespace) -> dict:
    """Measure every (variant, impl) arm, and the peer's with ``--peer``; returns the JSON-ready result.

    With ``--pairwise`` each variant is measured beside a fresh prenorm in a fresh process, one pair
    at a time, so only two models are alive at once and every pair starts from an empty heap (all
    eleven variants at the reference size do not fit in 24 GiB together, and one process running
    the pairs in turn ran out of memory at the tenth); ratios are always to the prenorm of the same
    pair. The peer is then the last pair.
    """
    variants = variant_names() if args.variants == "all" else args.variants.split(",")
    variants = [v for v in variants if v != "prenorm"]
    size = SIZES[args.size]
    precisions = args.precisions.split(",")
    for precision in precisions:
        check_precision_supported(precision, torch.device("cpu"))
    if args.compile:
        check_compile_supported("cpu")
    spec = peer = None
    if getattr(args, "peer", None):
        spec = PeerSpec(args.peer, parse_overrides(getattr(args, "peer_config", None)))
        peer = load_peer(spec, size, VOCAB)  # the contract's errors before any timing
        for note in peer.notes:
            print(f"{peer.label}: {note}", file=sys.stderr, flush=True)
        if args.pairwise:  # its pair comes last: build and check it now
            peer.check(peer.build(), *_batch(size), VOCAB)
    impls = args.impls.split(",")
    info: dict = {}
    if not args.pairwise:
        rows = _measure(
            ["prenorm", *variants], size, impls, args.repeats, precisions, args.compile, peer, info
        )
    else:
        rows = []
        pairs = [(["prenorm", v], None) for v in variants] + ([(["prenorm"], spec)] if spec else [])
        spawn = multiprocessing.get_context("spawn")
        for i, (arms, pair_peer) in enumerate(pairs):
            name = arms[-1] if pair_peer is None else pair_peer.label
            print(f"[{i + 1}/{len(pairs)}] {name} beside prenorm", file=sys.stderr, flush=True)
            with ProcessPoolExecutor(1, mp_context=spawn) as pool:
                job = (
                    arms,
                    size,
                    impls,
                    args.repeats,
                    precisions,
                    torch.get_num_threads(),
                    args.compile,
                    pair_peer,
                )
                pair, pair_info = pool.submit(_measure_in_child, *job).result()
            info.update(pair_info)
            for r in pair[1:]:
                print(f"    {r['arm']}: step {r['ratio_vs_prenorm']:.3f}x, memory {r['memory_ratio']:.3f}x",
                      file=sys.stderr, flush=True)  # fmt: skip
            rows += pair if not rows else pair[1:]
    result = {"bench": "train", "size": args.size, "shape": size, "repeats": args.repeats,
              "precisions": precisions, "pairwise": args.pairwise, "compile": args.compile, "rows": rows,
              "machine": machine()}  # fmt: skip
    if spec is not None:
        result["peer"] = info["peer"]
    return result


def _measure_in_child(
    variants: list[str],
    size: dict,
    impls: list[str],
    repeats: int,
    precisions: list[str],
    threads: int,
    compile: bool,
    peer: PeerSpec | None = None,
) -> tuple[list[dict], dict]:
    torch.set_num_threads(threads)
    info: dict = {}
    return _measure(variants, size, impls, repeats, precisions, compile, peer, info), info


def _measure(
    variants: list[str],
    size: dict,
    impls: list[str],
    repeats: int,
    precisions: list[str],
    compile: bool = False,
    peer: PeerSpec | Peer | None = None,
    info: dict | None = None,
) -> list[dict]:
    """Rows for ``variants`` (the first is the baseline) × ``precisions``, all arms interleaved in one run.

    ``peer``: one more arm per precision, after ours, the model of the ``--peer`` checkout
    (:mod:`attnres.bench.peer`; loaded here from a spec); its contract errors are raised before any
    timing, and what was mapped goes to ``info["peer"]``, with the parameter counts of both sides.

    ``compile``: each arm's model under ``torch.compile``. All arms' graphs belong to one code object
    (``Transformer.forward``), two per arm (training and the no-grad forward), so the recompile limit
    is raised to fit them: past it, dynamo would silently run the later arms eagerly.
    """
    if compile:
        allow_graphs(2 * len(precisions) * sum(len(impls) if v in ATTNRES else 1 for v in variants) + 2)
    model_kw = {k: v for k, v in size.items() if k != "batch"}
    inputs, targets = _batch(size)
    loaded = load_peer(peer, size, VOCAB) if isinstance(peer, PeerSpec) else peer

    def ours(model: torch.nn.Module, train: bool = True) -> torch.Tensor:
        return lm_loss(model(inputs), targets) if train else model(inputs)

    def theirs(model: torch.nn.Module, train: bool = True) -> torch.Tensor:
        # nanoGPT's forward(idx, targets) -> (logits, loss); without targets it keeps the last
        # position's logits only, so the no-grad arm passes them too and computes the full logits
        return model(inputs, targets)[1]

    arms, fwd_arms, memory, base_of, n_params = {}, {}, {}, {}, {}
    for precision in precisions:
        prec = Precision(precision, torch.device("cpu"))
        suffix = "" if len(precisions) == 1 else f" {precision}"
        builds = []
        for variant in variants:
            for impl in impls if variant in ATTNRES else ["-"]:
                name = (variant if impl == "-" else f"{variant}[{impl}]") + suffix
                mode = "auto" if impl == "-" else impl  # other variants read as they do by default

                def build(variant: str = variant) -> torch.nn.Module:
                    torch.manual_seed(0)
                    return Transformer(
                        ModelConfig(vocab_size=VOCAB, residual=ResidualConfig(variant), **model_kw)
                    )

                builds.append((name, build, ours, mode))
        if loaded is not None:
            builds.append((loaded.label + suffix, loaded.build, theirs, "auto"))
        for name, build, call, mode in builds:
            base_of[name] = variants[0] + suffix
            model = build()
            n_params[name] = sum(p.numel() for p in model.parameters())
            if call is theirs:
                loaded.check(model, inputs, targets, VOCAB)
                if info is not None:
                    info["peer"] = {**loaded.info(model), "prenorm_params": n_params[base_of[name]]}
            model = prec.prepare(model)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            run_model = torch.compile(model) if compile else model

            def step(model=run_model, opt=opt, mode=mode, prec=prec, call=call) -> None:
                with use_impl(mode), prec.autocast():
                    loss = call(model)
                prec.backward(loss)
                opt.step()  # no clipping here, so the scaler's unscale-before-step is not needed
                opt.zero_grad(set_to_none=True)

            def forward(model=run_model, mode=mode, prec=prec, call=call) -> None:
                with torch.no_grad(), use_impl(mode), prec.autocast():
                    call(model, train=False)

            arms[name], fwd_arms[name] = step, forward
            param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            with saved_bytes() as saved, use_impl(mode), prec.autocast():
                loss = call(model)
            del loss
            memory[name] = (saved[0] + 4 * param_bytes) / 2**20

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


def _batch(size: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The one batch every arm trains on: inputs and targets ``[batch, seq_len]``."""
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (size["batch"], size["seq_len"] + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


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
    p.add_argument(
        "--peer",
        metavar="DIR",
        help="also time a nanoGPT-style AttnRes checkout at the same shape, in the same interleaved run "
        "(arm 'peer:<dirname>'): DIR/model.py must define GPTConfig and GPT, GPT(config).forward(idx, "
        "targets) -> (logits, loss); the shape is mapped to its config fields (n_embd, n_layer, n_head, "
        "block_size, vocab_size, attnres_block_size, ...; see attnres.bench.peer). This IMPORTS AND RUNS "
        "the code in DIR: use only a checkout you trust. Nothing is downloaded",
    )
    p.add_argument(
        "--peer-config",
        action="append",
        metavar="KEY=VALUE",
        help="set a field of the peer's GPTConfig, after the mapping (repeatable; a Python literal, else "
        "a string), e.g. attnres_variant=full",
    )
    p.add_argument("--json", action="store_true", help="end stdout with one JSON line")


def main(args: argparse.Namespace) -> None:
    """``attnres bench train``: the table on stdout; with ``--json`` one JSON line last."""
    result = run(args)
    emit(table(result), result, args.json)
