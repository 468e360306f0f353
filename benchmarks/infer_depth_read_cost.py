"""The residual scheme's share of one decode step: its 17 reads and updates at d=512, 16 sublayers.

Runs the scheme's own loop (``init_state``, ``layer_input``, ``update``, ``final``) on one token per
row with fixed stand-in sublayer outputs, so only the depth bookkeeping and reads are timed.
Usage: ``flock /tmp/attnres-bench.lock python benchmarks/infer_depth_read_cost.py``.
"""

import statistics
import time

import torch

from attnres.residuals import ResidualConfig, build_residual

D, SUBLAYERS, REPEATS = 512, 16, 200


def scheme_ms(variant: str, batch: int) -> float:
    """Median ms of one decode step's residual work for ``variant``."""
    torch.manual_seed(0)
    scheme = build_residual(ResidualConfig(variant=variant), D, SUBLAYERS)
    with torch.no_grad():
        for p in scheme.parameters():
            p.add_(0.1 * torch.randn_like(p))
        embedding = torch.randn(batch, 1, D)
        outs = [torch.randn(batch, 1, D) for _ in range(SUBLAYERS)]
        times = []
        for _ in range(REPEATS):
            start = time.perf_counter()
            state = scheme.init_state(embedding)
            for layer, out in enumerate(outs):
                scheme.layer_input(state, layer)
                state = scheme.update(state, layer, out)
            scheme.final(state)
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


if __name__ == "__main__":
    torch.set_num_threads(1)
    for batch in (1, 8):
        for variant in ("prenorm", "block", "full"):
            ms = scheme_ms(variant, batch)
            print(f"B={batch} {variant}: residual reads + updates per decode step, median {ms:.3f} ms")
