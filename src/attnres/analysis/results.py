"""A finished run's result (``OUT/result.json``) and the table that compares runs.

Training writes the file (:func:`write_result`, at the end of ``attnres.train.train``); everything
that compares runs reads it: ``attnres compare`` (to reuse finished runs and print
:func:`summary_table`) and ``attnres report``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from attnres.analysis.stats import format_difference, format_mean_std, variant_stats

RESULT_FILE = "result.json"


@dataclass
class RunResult:
    """What a finished run reports (also written to ``OUT/result.json``).

    ``seconds`` (wall time of the training loop) and ``tokens_per_s`` (over timed steps: all but
    each session's first) cover every session of a resumed run, whatever device, threads or
    parallel layout each session used; a session's time ends at its last checkpoint. Resumed from
    a checkpoint written before timing was kept there, ``seconds`` is NaN and ``tokens_per_s``
    covers the later sessions only.
    """

    variant: str
    seed: int
    steps: int
    final_val_loss: float
    final_train_loss: float
    tokens_per_s: float
    n_params: int
    train_tokens: int
    train_flops: float
    seconds: float


def write_result(result: RunResult, run_dir: str | Path) -> Path:
    """Write ``run_dir/result.json`` and return its path."""
    path = Path(run_dir) / RESULT_FILE
    path.write_text(json.dumps(dataclasses.asdict(result), indent=2))
    return path


def read_result(run_dir: str | Path) -> RunResult:
    """The :class:`RunResult` in ``run_dir/result.json``."""
    return RunResult(**json.loads((Path(run_dir) / RESULT_FILE).read_text()))


def summary_table(results: list[RunResult], baseline: str = "prenorm") -> str:
    """A plain-text table of :func:`~attnres.analysis.stats.variant_stats`: the compute per run, so
    runs compare at equal compute, and each variant's paired difference to the baseline with its
    95% interval."""
    head = (
        f"{'variant':<13} {'seeds':>5} {'val loss (mean ± std)':>22} {'vs ' + baseline + ' [95% CI]':>34} "
        f"{'tokens':>9} {'FLOPs':>9} {'params':>9} {'tok/s':>7}"
    )
    lines = [head, "-" * len(head)]
    for row in variant_stats([dataclasses.asdict(r) for r in results], baseline):
        delta = format_difference(row, baseline)
        lines.append(
            f"{row['variant']:<13} {row['seeds']:>5} "
            f"{format_mean_std(row['val_loss_mean'], row['val_loss_std'], row['seeds']):>22} "
            f"{delta:>34} {row['train_tokens']:>9.3g} {row['train_flops']:>9.3g} {row['n_params']:>9,} "
            f"{row['tokens_per_s']:>7,.0f}"
        )
    return "\n".join(lines)
