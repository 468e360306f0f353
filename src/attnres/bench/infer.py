"""Inference cost of AttnRes next to PreNorm: prefill throughput, decode latency, peak memory.

Run ``attnres bench infer [--json]`` (or ``python -m attnres.bench.infer``). Every variant is built
with the same seed and shape, and timings are interleaved: each repeat times every variant once,
in turn, so machine noise hits them alike. Figures are medians over repeats (prefill) or over all
timed decode steps (decode), and ratios are to PreNorm measured in the same run.

Peak memory is measured in a fresh process per (variant, workload): the resident-set high-water
mark (``VmHWM``, reset through ``/proc/self/clear_refs``) during the workload, minus the resident
set before it, so weights and the allocator's earlier pages are not counted. Linux only.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch

from attnres.bench.measure import emit, machine, take_turns
from attnres.model import ModelConfig, Transformer
from attnres.model.cache import KVCache
from attnres.model.generate import prefill

VARIANTS = ("prenorm", "block", "full")


@dataclass
class InferBenchConfig:
    """What to measure.

    Attributes:
        variants: residual variants; the first is the baseline of every ratio. ``NAME[IMPL]``
            pins the depth-read implementation (``block[reference]`` is the naive read next to
            ``block``, which reads with ``auto``).
        d_model, n_layers, n_heads, vocab_size: model shape (``2 * n_layers`` sublayers).
        prefill_lens: prompt lengths ``T`` for prefill throughput (batch 1).
        decode_batches: batch sizes for decode latency.
        decode_context: prompt tokens prefilled before the timed decode steps.
        decode_steps: timed decode steps per repeat (the median is over all of them).
        prefill_chunk: chunk size of the extra chunked-prefill memory row at the longest ``T``.
        repeats: interleaved repeats.
        threads: torch intra-op threads (``None``: torch's default).
        memory: measure peak memory (one subprocess per variant and workload).
    """

    variants: tuple[str, ...] = VARIANTS
    d_model: int = 512
    n_layers: int = 8
    n_heads: int = 8
    vocab_size: int = 8192
    prefill_lens: tuple[int, ...] = (512, 2048)
    decode_batches: tuple[int, ...] = (1, 8)
    decode_context: int = 128
    decode_steps: int = 64
    prefill_chunk: int = 512
    repeats: int = 5
    threads: int | None = None
    memory: bool = True
    seed: int = 0

    @property
    def seq_len(self) -> int:
        return max(max(self.prefill_lens), self.decode_context + self.decode_steps + 1)


def build(cfg: InferBenchConfig, variant: str) -> Transformer:
    """The benchmark model for ``variant`` (``NAME`` or ``NAME[IMPL]``), in eval mode. Queries are
    random, not zero: a trained model's reads are not uniform, and zero queries could flatter a
    fast path."""
    name, _, impl = variant.partition("[")
    torch.manual_seed(cfg.seed)
    model_cfg = ModelConfig(
        vocab_size=cfg.vocab_size,
        d_model=cfg.d_model,
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        seq_len=cfg.seq_len,
        residual={"variant": name, "impl": impl.removesuffix("]") or "auto"},
    )
    model = Transformer(model_cfg).eval()
    with torch.no_grad():
        for p in model.residual.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _tokens(cfg: InferBenchConfig, batch: int, length: int) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (batch, length), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def time_prefill(model: Transformer, tokens: torch.Tensor) -> float:
    """Seconds for one one-shot prefill of ``tokens`` into a fresh cache."""
    cache = KVCache(model.cfg, tokens.shape[0], tokens.shape[1])
    start = time.perf_counter()
    prefill(model, tokens, cache)
    return time.perf_counter() - start


@torch.no_grad()
def time_decode(models: dict[str, Transformer], prompt: torch.Tensor, steps: int) -> dict[str, list[float]]:
    """Seconds of each of ``steps`` greedy decode steps after prefilling ``prompt``, per model.

    The models take turns step by step, so a burst of machine load hits all of them alike.
    """
    caches, nxt = {}, {}
    for name, model in models.items():
        caches[name] = KVCache(model.cfg, prompt.shape[0], prompt.shape[1] + steps)
        nxt[name] = prefill(model, prompt, caches[name]).argmax(-1)

    def step(name: str, model: Transformer) -> float:
        start = time.perf_counter()
        nxt[name] = model(nxt[name][:, None], cache=caches[name])[:, -1].argmax(-1)
        return time.perf_counter() - start

    return take_turns({name: functools.partial(step, name, m) for name, m in models.items()}, steps)


@torch.no_grad()
def profile_decode(cfg: InferBenchConfig, variant: str, batch: int = 1, steps: int = 16) -> str:
    """torch.profiler table of ``steps`` decode steps of ``variant``: where a step's time goes."""
    model = build(cfg, variant)
    prompt = _tokens(cfg, batch, cfg.decode_context)
    cache = KVCache(model.cfg, batch, cfg.decode_context + steps + 4)
    nxt = prefill(model, prompt, cache).argmax(-1)
    for _ in range(4):  # warm-up
        nxt = model(nxt[:, None], cache=cache)[:, -1].argmax(-1)
    with torch.profiler.profile() as prof:
        for _ in range(steps):
            nxt = model(nxt[:, None], cache=cache)[:, -1].argmax(-1)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14)


@torch.no_grad()
def profile_prefill(cfg: InferBenchConfig, variant: str, repeats: int = 2) -> str:
    """torch.profiler table of ``repeats`` one-shot prefills of ``variant`` at the longest length."""
    model = build(cfg, variant)
    tokens = _tokens(cfg, 1, max(cfg.prefill_lens))
    time_prefill(model, tokens)  # warm-up
    with torch.profiler.profile() as prof:
        for _ in range(repeats):
            time_prefill(model, tokens)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14)


def _workloads(cfg: InferBenchConfig) -> list[tuple[str, int, int, int | None]]:
    """(name, batch, prompt length, prefill chunk) of every measured workload."""
    rows = [(f"prefill T={T}", 1, T, None) for T in cfg.prefill_lens]
    longest = max(cfg.prefill_lens)
    if cfg.prefill_chunk < longest:
        rows.append((f"prefill T={longest} chunk={cfg.prefill_chunk}", 1, longest, cfg.prefill_chunk))
    rows += [(f"decode B={B}", B, cfg.decode_context, None) for B in cfg.decode_batches]
    return rows


def _joined(turns: list[dict[str, list[float]]], variant: str) -> list[float]:
    """``variant``'s times over all repeats of one workload, in order."""
    return [t for turn in turns for t in turn[variant]]


def _read_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _peak_memory_child(cfg: InferBenchConfig, variant: str, workload: tuple, queue) -> None:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    _, batch, length, chunk = workload
    model = build(cfg, variant)
    tokens = _tokens(cfg, batch, length)
    with torch.no_grad():
        model(tokens[:, :2])  # load kernels and libraries before the baseline
        before = _read_status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        decoding = workload[0].startswith("decode")
        cache = KVCache(model.cfg, batch, length + (cfg.decode_steps if decoding else 0))
        nxt = prefill(model, tokens, cache, chunk=chunk).argmax(-1)
        for _ in range(cfg.decode_steps if decoding else 0):
            nxt = model(nxt[:, None], cache=cache)[:, -1].argmax(-1)
    queue.put((_read_status_kib("VmHWM") - before) / 1024)


def peak_memory_mib(cfg: InferBenchConfig, variant: str, workload: tuple) -> float:
    """Peak resident memory (MiB) of ``workload`` above the resident set before it, in a fresh process."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_memory_child, args=(cfg, variant, workload, queue))
    proc.start()
    result = queue.get(timeout=600)
    proc.join()
    return result


def run(cfg: InferBenchConfig, log=print) -> dict:
    """Measure every variant; returns the results as a JSON-able dict."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    load_before = os.getloadavg()
    models = {v: build(cfg, v) for v in cfg.variants}
    for m in models.values():  # warm-up, untimed
        time_prefill(m, _tokens(cfg, 1, min(64, cfg.seq_len)))
    time_decode(models, _tokens(cfg, 1, min(8, cfg.seq_len - 4)), 4)

    def prefill_turn(T: int) -> dict[str, list[float]]:
        tokens = _tokens(cfg, 1, T)
        return take_turns({v: functools.partial(time_prefill, m, tokens) for v, m in models.items()}, 1)

    # each repeat: every prefill length, then every decode batch, the variants taking turns in each
    workloads = {("prefill", T): functools.partial(prefill_turn, T) for T in cfg.prefill_lens}
    for B in cfg.decode_batches:
        prompt = _tokens(cfg, B, cfg.decode_context)
        workloads["decode", B] = functools.partial(time_decode, models, prompt, cfg.decode_steps)
    rounds = take_turns(
        workloads, cfg.repeats, lambda r: log(f"repeat {r + 1}/{cfg.repeats}", file=sys.stderr)
    )
    prefill_s = {v: {T: _joined(rounds["prefill", T], v) for T in cfg.prefill_lens} for v in cfg.variants}
    decode_s = {v: {B: _joined(rounds["decode", B], v) for B in cfg.decode_batches} for v in cfg.variants}
    results: dict = {"variants": {}}
    for v in cfg.variants:
        row: dict = {}
        for T in cfg.prefill_lens:
            times = prefill_s[v][T]
            row[f"prefill_T{T}_tok_per_s"] = T / statistics.median(times)
            row[f"prefill_T{T}_s_all"] = times
        for B in cfg.decode_batches:
            times = decode_s[v][B]
            row[f"decode_B{B}_ms_per_token"] = 1e3 * statistics.median(times)
            row[f"decode_B{B}_ms_iqr"] = [1e3 * q for q in statistics.quantiles(times, n=4)[::2]]
            row[f"decode_B{B}_steps"] = len(times)
        results["variants"][v] = row
    if cfg.memory:
        for v in cfg.variants:
            for w in _workloads(cfg):
                log(f"peak memory: {v} {w[0]}", file=sys.stderr)
                results["variants"][v][f"peak_mib {w[0]}"] = peak_memory_mib(cfg, v, w)
    base = results["variants"][cfg.variants[0]]
    for row in results["variants"].values():
        for key in list(row):
            if key.endswith(("tok_per_s", "ms_per_token")) or key.startswith("peak_mib"):
                row[f"ratio {key}"] = row[key] / base[key] if base[key] else float("nan")
    results["config"] = asdict(cfg)
    results["machine"] = machine(load_before)
    return results


def table(results: dict) -> str:
    """The human table: one line per figure, one column per variant with its ratio to the baseline."""
    variants = list(results["variants"])
    first = results["variants"][variants[0]]
    metrics = [k for k in first if k.endswith(("tok_per_s", "ms_per_token")) or k.startswith("peak_mib")]
    metrics = [k for k in metrics if not k.startswith("ratio")]
    head = f"{'figure':<40}" + "".join(f"{v:>22}" for v in variants)
    lines = [head, "-" * len(head)]
    for key in metrics:
        cells = []
        for v in variants:
            row = results["variants"][v]
            cells.append(f"{row[key]:>12.2f} ({row['ratio ' + key]:.3f}x)")
        lines.append(f"{_label(key):<40}" + "".join(f"{c:>22}" for c in cells))
    return "\n".join(lines)


def _label(key: str) -> str:
    if key.startswith("peak_mib"):
        return f"peak MiB, {key.removeprefix('peak_mib ')}"
    if key.endswith("tok_per_s"):
        return f"prefill tokens/s, T={key.split('_T')[1].split('_')[0]}"
    return f"decode ms/token, B={key.split('_B')[1].split('_')[0]}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``attnres bench infer``."""
    d = InferBenchConfig()
    parser.add_argument("--json", action="store_true", help="end stdout with one JSON line of results")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=list(d.variants),
        help="first one is the baseline; NAME[IMPL] pins the read, e.g. block[reference]",
    )
    parser.add_argument("--d-model", type=int, default=d.d_model)
    parser.add_argument(
        "--n-layers", type=int, default=d.n_layers, help="Transformer layers, 2 sublayers each"
    )
    parser.add_argument("--vocab-size", type=int, default=d.vocab_size)
    parser.add_argument("--prefill-lens", type=int, nargs="+", default=list(d.prefill_lens))
    parser.add_argument("--decode-batches", type=int, nargs="+", default=list(d.decode_batches))
    parser.add_argument("--decode-steps", type=int, default=d.decode_steps)
    parser.add_argument("--repeats", type=int, default=d.repeats)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="only print profiles per variant: 16 decode steps (batch 1), 2 prefills at the longest length",
    )


def main(args: argparse.Namespace) -> dict:
    """Run the benchmark from parsed arguments; print the table (and the JSON line with ``--json``)."""
    cfg = InferBenchConfig(
        variants=tuple(args.variants),
        d_model=args.d_model,
        n_layers=args.n_layers,
        vocab_size=args.vocab_size,
        prefill_lens=tuple(args.prefill_lens),
        decode_batches=tuple(args.decode_batches),
        decode_steps=args.decode_steps,
        repeats=args.repeats,
        threads=args.threads,
        memory=not args.no_memory,
    )
    if args.profile:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        longest = max(cfg.prefill_lens)
        for v in cfg.variants:
            print(f"== decode profile: {v}, batch 1, 16 steps\n{profile_decode(cfg, v)}")
            print(f"== prefill profile: {v}, batch 1, T={longest}, 2 prefills\n{profile_prefill(cfg, v)}")
        return {}
    results = run(cfg)
    emit(table(results), results, args.json)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    main(parser.parse_args())
