"""Where a train step's time goes: torch.profiler tables of prenorm, Block and Full AttnRes.

The ``--size small`` shape of ``attnres bench train`` (d=128, 8 layers = 16 sublayers, seq 256,
batch 8, fp32, AdamW), three steps after three warm-up steps, sorted by self CPU time.
Usage: ``python benchmarks/profile_train_step.py [--rows 18]`` (torch's default threads).
"""

from __future__ import annotations

import argparse

import torch

from attnres.model import ModelConfig, Transformer, lm_loss


def profile(variant: str, rows: int) -> str:
    """The profiler table of three train steps of ``variant``."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=256, d_model=128, n_layers=8, n_heads=4, seq_len=256, residual={"variant": variant}
    )
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 256, (8, 257))

    def step() -> None:
        lm_loss(model(x[:, :-1]), x[:, 1:]).backward()
        opt.step()
        opt.zero_grad()

    for _ in range(3):
        step()
    with torch.profiler.profile() as prof:
        for _ in range(3):
            step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=18)
    args = parser.parse_args()
    for variant in ("prenorm", "block", "full"):
        print(f"== train step profile: {variant}, 3 steps\n{profile(variant, args.rows)}")
