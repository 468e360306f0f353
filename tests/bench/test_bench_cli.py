"""``attnres bench ops``, ``train``, ``memory`` and ``pipeline`` run end to end; stdout ends with JSON."""

from __future__ import annotations

import json

import pytest

from attnres.cli import main


def test_bench_ops_json_last_line(capsys) -> None:
    main(["bench", "ops", "--n", "1,3", "--d", "32", "--tokens", "16", "--repeats", "1", "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {(r["n"], r["impl"]) for r in result["rows"]} == {
        (n, impl)
        for n in (1, 3)
        for impl in ("reference", "fused", "fused[torch ops]", "two_phase", "two_phase[torch ops]")
    }
    assert all(r["ms_per_read"] > 0 and r["saved_mb_per_read"] > 0 for r in result["rows"])


def test_bench_train_pairwise_json(capsys) -> None:
    args = ["bench", "train", "--size", "tiny", "--variants", "block,rezero", "--impls", "auto"]
    main([*args, "--repeats", "1", "--pairwise", "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["arm"] for r in result["rows"]] == ["prenorm", "block[auto]", "rezero"]
    assert result["rows"][0]["ratio_vs_prenorm"] == 1.0
    assert all(r["step_ms"] > 0 and r["memory_ratio"] > 0 for r in result["rows"])


def test_bench_memory_json(capsys) -> None:
    main(["bench", "memory", "--size", "tiny", "--variants", "prenorm,block", "--repeats", "1", "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    kept = {(r["variant"], r["mode"]): r["kept_mb"] for r in result["rows"]}
    assert set(kept) == {(v, m) for v in ("prenorm", "block") for m in ("none", "sublayer", "block")}
    assert all(kept[v, "block"] < kept[v, "none"] for v in ("prenorm", "block"))
    assert "| block | block |" in "\n".join(out)


@pytest.mark.distributed
def test_bench_pipeline_json(capsys) -> None:
    args = ["--pp", "2", "--vpp", "1", "--n-layers", "2", "--d-model", "16", "--seq-len", "8"]
    main(["bench", "pipeline", *args, "--microbatches", "2", "--microbatch-size", "1", "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result["modes"]) == {"off", "received", "seen"}
    assert result["modes"]["seen"]["fwd_bytes"] <= result["modes"]["off"]["fwd_bytes"]
    per_block = result["microbatches"] * result["microbatch_tokens"] * result["d_model"]  # elements
    for mode in result["modes"].values():
        for t in mode["transitions"]:
            assert t["fwd_elements"] == (t["expected_blocks_per_token"] + 1) * per_block  # + the partial
            assert t["fwd_bytes"] == 4 * t["fwd_elements"]  # fp32
            assert (t["bwd_elements"], t["bwd_bytes"]) == (t["fwd_elements"], t["fwd_bytes"])
        assert mode["fwd_elements"] == sum(t["fwd_elements"] for t in mode["transitions"])
