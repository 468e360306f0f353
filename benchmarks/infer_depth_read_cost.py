"""The residual scheme's share of one decode step: its 17 reads and 16 updates at d=512, 16 sublayers.

Runs the scheme's loop as the model runs it (``init_state``; per sublayer ``fused_normed_input``
with its RMSNorm, else ``layer_input`` and the norm; ``update``; ``normed_final``) without gradients
on one token per row with fixed stand-in sublayer outputs, so only the depth bookkeeping, reads and
pre-norms are timed (prenorm's row is its adds and norms), per depth-read implementation and kernel
set, and counts the aten operators one step dispatches (a native kernel call counts none).
Usage: ``python benchmarks/infer_depth_read_cost.py`` (one thread).
"""

import statistics
import time

import torch

from attnres.ops.dispatch import use_impl, use_kernels
from attnres.residuals import ResidualConfig, build_residual

D, SUBLAYERS, REPEATS = 512, 16, 300


def scheme_step(variant: str, batch: int):
    """One decode step's residual work for ``variant``, as a closure."""
    torch.manual_seed(0)
    scheme = build_residual(ResidualConfig(variant=variant), D, SUBLAYERS)
    with torch.no_grad():
        for p in scheme.parameters():
            p.add_(0.1 * torch.randn_like(p))
    embedding = torch.randn(batch, 1, D)
    outs = [torch.randn(batch, 1, D) for _ in range(SUBLAYERS)]
    norms = [torch.nn.RMSNorm(D, eps=1e-6) for _ in range(SUBLAYERS + 1)]

    def step() -> None:
        state = scheme.init_state(embedding)
        for layer, out in enumerate(outs):  # as Transformer.run_sublayers: the fused read, else read + norm
            if scheme.fused_normed_input(state, layer, norms[layer]) is None:
                norms[layer](scheme.layer_input(state, layer))
            state = scheme.update(state, layer, out)
        scheme.normed_final(state, norms[-1])

    return step


def measure(variant: str, impl: str, kernels: str, batch: int) -> tuple[float, int]:
    """Median ms of one step and the number of operators it dispatches."""
    step = scheme_step(variant, batch)
    with torch.no_grad(), use_impl(impl), use_kernels(kernels):
        for _ in range(20):
            step()
        times = []
        for _ in range(REPEATS):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        with torch.profiler.profile() as prof:
            step()
    ops = sum(e.count for e in prof.key_averages())
    return 1e3 * statistics.median(times), ops


if __name__ == "__main__":
    torch.set_num_threads(1)
    for batch in (1, 8):
        for variant in ("prenorm", "block", "full"):
            arms = [("reference", "torch"), ("two_phase", "torch"), ("two_phase", "native")]
            for impl, kernels in arms if variant != "prenorm" else arms[:1]:
                ms, ops = measure(variant, impl, kernels, batch)
                arm = f"{impl}/{kernels}"
                print(f"B={batch} {variant:<8} {arm:<17} {ms:6.3f} ms per decode step, {ops:4d} ops")
