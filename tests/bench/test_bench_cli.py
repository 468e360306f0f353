"""``attnres bench ops`` runs end to end and ends stdout with one JSON line."""

from __future__ import annotations

import json

from attnres.cli import main


def test_bench_ops_json_last_line(capsys) -> None:
    main(["bench", "ops", "--n", "1,3", "--d", "32", "--tokens", "16", "--repeats", "1", "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {(r["n"], r["impl"]) for r in result["rows"]} == {
        (n, impl) for n in (1, 3) for impl in ("reference", "fused", "two_phase")
    }
    assert all(r["ms_per_read"] > 0 and r["saved_mb_per_read"] > 0 for r in result["rows"])
