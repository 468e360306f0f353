"""`attnres bench infer` runs end to end on a tiny model and reports ratios to the first variant."""

from __future__ import annotations

import json

import pytest

from attnres.bench.infer import InferBenchConfig, peak_memory_mib, run, table
from attnres.cli import main as cli


def test_tiny_benchmark_reports_every_figure_and_ratio() -> None:
    cfg = InferBenchConfig(
        variants=("prenorm", "block", "block[reference]"),
        d_model=32,
        n_layers=2,
        n_heads=2,
        vocab_size=64,
        prefill_lens=(8, 16),
        decode_batches=(1, 2),
        decode_context=4,
        decode_steps=3,
        repeats=2,
        memory=False,
    )
    results = run(cfg, log=lambda *a, **k: None)
    block = results["variants"]["block"]
    assert block["decode_B2_steps"] == 6
    assert results["variants"]["prenorm"]["ratio decode_B1_ms_per_token"] == 1.0
    assert block["ratio prefill_T16_tok_per_s"] == pytest.approx(
        block["prefill_T16_tok_per_s"] / results["variants"]["prenorm"]["prefill_T16_tok_per_s"]
    )
    assert "decode ms/token, B=2" in table(results)
    assert results["variants"]["block[reference]"]["decode_B2_steps"] == 6


def test_cli_json_is_the_last_line(capsys: pytest.CaptureFixture) -> None:
    cli(
        [
            "bench",
            "infer",
            "--json",
            "--no-memory",
            "--d-model",
            "32",
            "--n-layers",
            "1",
            "--vocab-size",
            "64",
        ]
        + ["--prefill-lens", "8", "--decode-batches", "1", "--decode-steps", "2", "--repeats", "1"]
    )
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert set(json.loads(last)["variants"]) == {"prenorm", "block", "full"}


@pytest.mark.slow
def test_peak_memory_grows_with_the_prompt() -> None:
    cfg = InferBenchConfig(variants=("full",), d_model=256, n_layers=4, vocab_size=64, prefill_lens=(2048,))
    small = peak_memory_mib(cfg, "full", ("prefill", 1, 64, None))
    large = peak_memory_mib(cfg, "full", ("prefill", 1, 2048, None))
    assert large > small + 10  # sources alone: 9 x 2048 x 256 x 4 B = 18 MiB
