"""``attnres bench memory``: activation memory of one training step under activation checkpointing.

For each variant and each ``train.activation_checkpointing`` mode (``none``, ``sublayer``,
``block``), one forward and backward of the reference LM on the same batch, measured with
:func:`attnres.bench.measure.step_memory` (``torch.profiler``'s allocation events: exact, and
unaffected by the machine's load):

- ``kept``: bytes allocated by the forward and still alive when the backward starts, i.e. what
  the step keeps for the backward (activations, checkpoint inputs, logits);
- ``peak``: the most bytes alive at any moment of the forward and backward, gradients included
  (parameters and optimiser state, the same for every mode, are not).

Step times (median of ``--repeats``, arms interleaved, without the profiler) are rough: other
jobs may share the machine.
"""

from __future__ import annotations

import argparse

import torch

from attnres.bench.measure import emit, interleaved_medians, machine, step_memory
from attnres.bench.train import SIZES
from attnres.model import ModelConfig, Transformer, lm_loss
from attnres.model.transformer import CHECKPOINT_MODES
from attnres.residuals import ResidualConfig


def run(args: argparse.Namespace) -> dict:
    """Measure every (variant, mode) arm; returns the JSON-ready result."""
    size = SIZES[args.size]
    model_kw = {k: v for k, v in size.items() if k != "batch"}
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (size["batch"], size["seq_len"] + 1), generator=gen)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    rows, steps = [], {}
    for variant in args.variants.split(","):
        torch.manual_seed(0)
        model = Transformer(ModelConfig(vocab_size=256, residual=ResidualConfig(variant), **model_kw))
        for mode in CHECKPOINT_MODES:
            model.set_activation_checkpointing(mode)
            mem = step_memory(model, inputs, targets)
            rows.append(
                {"variant": variant, "mode": mode, "kept_mb": mem.kept / 2**20, "peak_mb": mem.peak / 2**20}
            )

            def step(model: Transformer = model, mode: str = mode) -> None:
                model.set_activation_checkpointing(mode)
                lm_loss(model(inputs), targets).backward()
                model.zero_grad(set_to_none=True)

            steps[variant, mode] = step
    times = interleaved_medians(steps, args.repeats) if args.repeats else {}
    for row in rows:
        row["step_ms"] = times.get((row["variant"], row["mode"]), float("nan"))
    return {"bench": "memory", "size": args.size, "shape": size, "rows": rows, "machine": machine()}


def table(result: dict) -> str:
    """Markdown table of :func:`run`'s result; ratios of ``kept`` to PreNorm's, same mode and none."""
    kept = {(r["variant"], r["mode"]): r["kept_mb"] for r in result["rows"]}
    lines = [
        "| variant | checkpointing | kept for backward (MiB) | x prenorm, same mode | x prenorm, none "
        "| peak (MiB) | step (ms, rough) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        same, none = kept.get(("prenorm", r["mode"])), kept.get(("prenorm", "none"))
        ratios = [f"{r['kept_mb'] / b:.2f}" if b else "-" for b in (same, none)]
        lines.append(
            f"| {r['variant']} | {r['mode']} | {r['kept_mb']:.1f} | {ratios[0]} | {ratios[1]} "
            f"| {r['peak_mb']:.1f} | {r['step_ms']:.0f} |"
        )
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``attnres bench memory`` flags."""
    p.add_argument("--variants", default="prenorm,block,full", help="comma-separated variant names")
    p.add_argument("--size", choices=tuple(SIZES), default="reference")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per arm (0: no timing)")
    p.add_argument("--json", action="store_true", help="end stdout with one JSON line")


def main(args: argparse.Namespace) -> None:
    """``attnres bench memory``: the table on stdout; with ``--json`` one JSON line last."""
    result = run(args)
    emit(f"bench memory, size {result['size']} {result['shape']}\n{table(result)}", result, args.json)
