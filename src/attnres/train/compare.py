"""Train several residual variants on identical data and seeds, and summarise them side by side."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from attnres.analysis.plots import plot_loss_curves
from attnres.analysis.results import RunResult, read_result
from attnres.analysis.stats import variant_stats
from attnres.configs import ConfigError, apply_overrides
from attnres.residuals import variant_names
from attnres.residuals.registry import options_class, variants_with_option
from attnres.storage.checkpoint import has_checkpoint, run_config
from attnres.storage.config import TrainConfig, resume_conflicts
from attnres.train.loop import train


def run_name(variant: str, seed: int) -> str:
    return f"{variant}-s{seed}"


def parse_variants(spec: str) -> list[str]:
    """``"prenorm,block"`` or ``"all"`` -> variant names; unknown names list the valid ones."""
    names = variant_names() if spec == "all" else [v.strip() for v in spec.split(",") if v.strip()]
    unknown = [v for v in names if v not in variant_names()]
    if unknown or not names:
        raise ValueError(
            f"unknown variant(s) {unknown or spec!r}; valid variants: {', '.join(variant_names())}"
        )
    twice = sorted({v for v in names if names.count(v) > 1})
    if twice:  # one run directory per variant and seed: a repeat would train into the same one
        raise ValueError(f"variant(s) listed more than once: {', '.join(twice)}")
    return names


def check_residual_options(variants: list[str], options: Mapping[str, Any]) -> None:
    """Raise unless every key of ``options`` is an option of at least one of ``variants``."""
    have = {k for v in variants for k in (f.name for f in dataclasses.fields(options_class(v)))}
    unknown = [k for k in options if k not in have]
    if unknown:
        raise ConfigError(
            "; ".join(
                f"model.residual.{k} is an option of none of the variants compared ({', '.join(variants)})"
                + (f"; it is one of {', '.join(variants_with_option(k))}" if variants_with_option(k) else "")
                for k in unknown
            )
        )


def _variant_config(
    base: TrainConfig, variant: str, seed: int, threads: int | None, residual: Mapping[str, Any] | None = None
) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(options_class(variant))}
    options = {f"model.residual.{k}": v for k, v in (residual or {}).items() if k in names}
    model = dataclasses.replace(base.model, residual=base.model.residual.with_variant(variant))
    loop = dataclasses.replace(base.train, seed=seed)
    if threads is not None:  # parallel runs: split the cores, no interleaved progress bars
        loop = dataclasses.replace(loop, threads=threads, progress=False)
    return apply_overrides(dataclasses.replace(base, model=model, train=loop), options)


def _saved_result(cfg: TrainConfig, run_dir: Path) -> RunResult | None:
    """The result of a run ``compare`` finished earlier with ``cfg``; ``None`` if it must (re)train.

    A finished run is one with ``result.json``, whether or not its checkpoint is still there (committed
    results keep ``config.json``, ``result.json`` and the metrics, never checkpoints). A run directory
    trained with another config (other hyperparameters, data, model) is refused: reusing it would mix
    configs in one table. It may differ in how long it ran: fewer steps than ``cfg`` continue from its
    checkpoint, which therefore must be there.
    """
    finished = (run_dir / "result.json").exists()
    if not (has_checkpoint(run_dir) or (finished and (run_dir / "config.json").exists())):
        return None
    saved = run_config(run_dir)
    conflicts = resume_conflicts(saved, cfg)
    if conflicts:
        raise ValueError(
            f"{run_dir} was trained with a different config ({', '.join(conflicts)} differ); "
            "choose another --out, or delete that run directory to retrain it"
        )
    if saved.train.steps == cfg.train.steps and finished:
        return read_result(run_dir)
    if not has_checkpoint(run_dir):
        raise ValueError(
            f"{run_dir} finished {saved.train.steps} steps and has no checkpoint to continue to "
            f"{cfg.train.steps}; choose another --out, or delete that run directory to retrain it"
        )
    return None


def _train_run(cfg: TrainConfig, run_dir: Path, log: Callable[[str], None] = print) -> RunResult:
    """Train one run, continuing from its checkpoint if it has one.

    A run interrupted before its first checkpoint has nothing to continue from: :func:`train`
    starts it over in place (holding the run directory's lock, so never under a live run).
    """
    started = (run_dir / "config.json").exists() or has_checkpoint(run_dir)
    return train(cfg, run_dir, resume=started, log=log)


def compare(
    base: TrainConfig,
    variants: list[str],
    seeds: int,
    out_dir: str | Path,
    log: Callable[[str], None] = print,
    jobs: int = 1,
    residual: Mapping[str, Any] | None = None,
) -> list[RunResult]:
    """Train every (variant, seed) into ``out_dir/<variant>-s<seed>``; finished runs are reused.

    All runs share ``base`` except ``model.residual.variant`` and ``train.seed``; a variant keeps
    the options of ``base.model.residual`` it has too (``ResidualConfig.with_variant``), and takes
    those of ``residual`` (option name -> value, e.g. ``{"n_streams": "2"}`` from the command line)
    it has; each of those must be an option of some variant compared. The data order
    (``train.data_seed``) is the same for every run, so differences come from the variant alone.
    Resumable: a run with ``result.json`` is reused, one with only a checkpoint continues from it.
    ``jobs > 1`` trains that many runs at once in separate processes, each with
    ``cores // jobs`` threads (unless ``train.threads`` is set). Writes ``summary.json`` (per-run
    results and per-variant statistics) and ``loss_curves.png`` into ``out_dir``.
    """
    if jobs < 1 or seeds < 1:
        raise ValueError(f"--jobs and --seeds must be >= 1, got {jobs} and {seeds}")
    check_residual_options(variants, residual or {})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    threads = None
    if jobs > 1:
        threads = base.train.threads or max(1, (os.cpu_count() or 1) // jobs)
    done: dict[tuple[str, int], RunResult] = {}
    pending: list[tuple[str, int]] = []
    for variant in variants:
        for seed in range(seeds):
            run_dir = out / run_name(variant, seed)
            saved = _saved_result(_variant_config(base, variant, seed, threads, residual), run_dir)
            if saved is not None:
                log(f"{run_dir.name}: finished earlier, reusing its result")
                done[variant, seed] = saved
            else:
                pending.append((variant, seed))
    if jobs == 1:
        for variant, seed in pending:
            cfg = _variant_config(base, variant, seed, None, residual)
            done[variant, seed] = _train_run(cfg, out / run_name(variant, seed), log)
    else:
        import concurrent.futures as cf
        import multiprocessing

        with cf.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {
                pool.submit(
                    _train_run, _variant_config(base, v, s, threads, residual), out / run_name(v, s)
                ): (v, s)
                for v, s in pending
            }
            for fut in cf.as_completed(futures):
                done[futures[fut]] = result = fut.result()
                name = run_name(*futures[fut])
                log(f"{name}: val loss {result.final_val_loss:.4f} ({result.seconds:.0f} s)")
    results = [done[v, s] for v in variants for s in range(seeds)]
    records = [dataclasses.asdict(r) for r in results]
    summary = {"runs": records, "variants": variant_stats(records)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_loss_curves(
        {v: [out / run_name(v, s) for s in range(seeds)] for v in variants},
        out / "loss_curves.png",
        title=f"{base.data.corpus}, d={base.model.d_model}, {base.model.n_sublayers} sublayers, "
        f"{seeds} seed(s)",
    )
    return results
