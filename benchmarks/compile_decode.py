"""Decode latency compiled vs eager, per residual variant (``benchmarks/results/compile_cpu.md``).

Each variant's model decodes greedily after a prompt, eager and compiled
(:data:`attnres.model.generate.compiled_decode_step`) taking turns step by step, so machine load
hits both alike. Reported: median ms per decode step, the compiled/eager ratio, and the seconds of
the first compiled ``generate`` call (compilation included), which is what a one-off
``generate(..., compile=True)`` pays.

    PYTHONPATH=src python benchmarks/compile_decode.py --d-model 128 --n-layers 8 --steps 64 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from attnres.model import ModelConfig, Transformer
from attnres.model.cache import KVCache
from attnres.model.compile import allow_graphs
from attnres.model.generate import SamplingConfig, compiled_decode_step, decode_step, generate, prefill


@torch.no_grad()
def decode_times(model: Transformer, prompt: torch.Tensor, steps: int) -> dict[str, list[float]]:
    """Seconds per decode step, eager and compiled in turn, after one prefill each."""
    fns = {"eager": decode_step, "compiled": compiled_decode_step}
    caches, nxt = {}, {}
    for name in fns:
        caches[name] = KVCache(model.cfg, prompt.shape[0], prompt.shape[1] + steps + 1)  # the spare slot
        nxt[name] = prefill(model, prompt, caches[name]).argmax(-1)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(steps):
        for name, fn in fns.items():
            start = time.perf_counter()
            nxt[name] = fn(model, nxt[name][:, None], caches[name]).argmax(-1)
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="prenorm,block,full")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=8)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    variants = args.variants.split(",")
    allow_graphs(2 * len(variants) + 2)
    rows = {}
    for variant in variants:
        torch.manual_seed(0)
        cfg = ModelConfig(
            vocab_size=256,
            d_model=args.d_model,
            n_layers=args.n_layers,
            n_heads=4,
            seq_len=args.prompt + args.steps + 8,
            residual={"variant": variant},
        )
        model = Transformer(cfg).eval()
        prompt = torch.randint(0, 256, (1, args.prompt), generator=torch.Generator().manual_seed(1))
        greedy = SamplingConfig(temperature=0)
        start = time.perf_counter()
        generate(model, prompt.tolist(), 16, greedy, compile=True)
        first = time.perf_counter() - start
        start = time.perf_counter()
        generate(model, prompt.tolist(), 16, greedy)
        eager_call = time.perf_counter() - start
        times: dict[str, list[float]] = {"eager": [], "compiled": []}
        for _ in range(args.repeats):
            for name, ts in decode_times(model, prompt, args.steps).items():
                times[name] += ts
        eager_ms = 1e3 * statistics.median(times["eager"])
        compiled_ms = 1e3 * statistics.median(times["compiled"])
        rows[variant] = {
            "eager_ms_per_step": eager_ms,
            "compiled_ms_per_step": compiled_ms,
            "compiled_over_eager": compiled_ms / eager_ms,
            "first_compiled_generate_16_s": first,
            "eager_generate_16_s": eager_call,
        }
        print(
            f"{variant:<8} eager {eager_ms:7.2f} ms/step  compiled {compiled_ms:7.2f} ms/step  "
            f"({compiled_ms / eager_ms:.3f}x)  first compiled generate(16) {first:6.1f} s "
            f"vs eager {eager_call:.2f} s",
            flush=True,
        )
    base = rows[variants[0]]
    for row in rows.values():
        row["eager_vs_first_eager"] = row["eager_ms_per_step"] / base["eager_ms_per_step"]
        row["compiled_vs_first_compiled"] = row["compiled_ms_per_step"] / base["compiled_ms_per_step"]
    print(json.dumps({"args": vars(args), "threads": torch.get_num_threads(), "rows": rows}))


if __name__ == "__main__":
    main()
