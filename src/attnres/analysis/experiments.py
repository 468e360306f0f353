"""Reports of the experiments in ``experiments/`` that ``attnres report`` does not cover: the pilot
(seed spread and the seed count it implies) and the learning-rate sweep.

Both read only what an experiment commits: ``runs/<group>/<variant>-s<seed>/result.json`` and the
``config.json`` beside it (a group is one ``attnres compare --out``: a pilot setting, a sweep's
learning rate). The same files give the same ``report.md`` and PNGs, byte for byte::

    python -m attnres.analysis.experiments pilot experiments/pilot
    python -m attnres.analysis.experiments lr-sweep experiments/lr_sweep

The decision rule the pilot report applies is the one ``experiments/pilot/protocol.md`` fixes
before the runs; its parameters are :class:`PilotRule`'s defaults.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnres.analysis.power import detectable_difference, paired_power, sd_upper_bound, seeds_needed
from attnres.analysis.stats import PairedDiff, format_mean_std, mean_std, paired_difference

RUNS_DIR = "runs"
CHOICE_FILE = "choice.json"  # the pilot's decision, read by the experiments that use its setting


@dataclass(frozen=True)
class Run:
    """One finished run: its ``result.json`` and ``config.json`` (empty if it has none)."""

    variant: str
    seed: int
    result: dict[str, Any]
    config: dict[str, Any]

    @property
    def loss(self) -> float:
        return float(self.result["final_val_loss"])


def load_group(group_dir: Path) -> list[Run]:
    """The finished runs (those with ``result.json``) directly under ``group_dir``, by variant and seed."""
    runs = []
    for path in sorted(group_dir.glob("*/result.json")):
        result = json.loads(path.read_text())
        cfg_path = path.parent / "config.json"
        config = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        runs.append(Run(result["variant"], int(result["seed"]), result, config))
    return sorted(runs, key=lambda r: (r.variant, r.seed))


def load_groups(root: Path) -> dict[str, list[Run]]:
    """``{group name: runs}`` for every ``root/runs/<group>/`` holding at least one finished run."""
    base = root / RUNS_DIR
    if not base.is_dir():
        raise FileNotFoundError(
            f"{root} has no {RUNS_DIR}/ folder: nothing to report (run the experiment first)"
        )
    groups = {d.name: load_group(d) for d in sorted(base.iterdir()) if d.is_dir()}
    groups = {name: runs for name, runs in groups.items() if runs}
    if not groups:
        raise FileNotFoundError(f"{base} holds no finished run (no */*/result.json)")
    return groups


def _losses(runs: Sequence[Run], variant: str) -> dict[int, float]:
    return {r.seed: r.loss for r in runs if r.variant == variant}


def _finite(values: dict[int, float]) -> bool:
    return all(math.isfinite(v) for v in values.values())


def _fmt(x: float, digits: int = 4) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _fmt_diff(d: PairedDiff | None) -> str:
    if d is None:
        return "n/a"
    if d.n < 2:
        return f"{d.mean:+.4f} (1 pair, no CI)"
    return f"{d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}]"


def _loss_cell(values: dict[int, float]) -> str:
    if not values:
        return "n/a"
    mean, std = mean_std(list(values.values()))
    return format_mean_std(mean, std, len(values))


def describe_config(cfg: dict[str, Any]) -> str:
    """A setting in words: data, width, depth, tokens per run."""
    if not cfg:
        return "(no config.json)"
    m, d, t = cfg["model"], cfg["data"], cfg["train"]
    tok = "byte" if d["tokenizer"] == "byte" else f"BPE-{d['vocab_size']}"
    tokens = t["steps"] * t["batch_size"] * m["seq_len"]
    block = m["residual"].get("block_size")
    return (
        f"{d['corpus']} {tok}, d = {m['d_model']}, {2 * m['n_layers']} sublayers"
        + (f" (Block S = {block})" if block else "")
        + f", {t['steps']} steps × {t['batch_size']} × {m['seq_len']} = {tokens / 1e6:.2f}M tokens, "
        f"lr {cfg['optim']['lr']:g}"
    )


# ---------------------------------------------------------------------------------------------
# The pilot


@dataclass(frozen=True)
class PilotRule:
    """The pilot's decision rule (``experiments/pilot/protocol.md``, fixed before the runs).

    ``delta``: the true difference the experiments must be able to show (nats); ``power``: the
    probability that a 95% paired t interval then excludes zero; ``min_seeds``: the fewest seeds
    any experiment uses; ``arms`` and ``budget_hours``: E1's arms and wall-clock budget, which
    bound what a setting may cost; ``parallel``: runs trained at once (one thread each);
    ``tie``: settings whose costs are within this factor count as tied (the one with more tokens
    per run, then more sublayers, wins); ``min_pairs``: a setting with fewer finished pairs is
    not eligible; ``sd_confidence``: the one-sided level of the sd's upper bound; ``overhead_s``:
    what a run costs beyond the ``seconds`` its ``result.json`` reports.
    """

    delta: float = 0.02
    power: float = 0.8
    level: float = 0.95
    min_seeds: int = 5
    arms: int = 14
    budget_hours: float = 3.0
    parallel: int = 2
    tie: float = 1.1
    min_pairs: int = 3
    sd_confidence: float = 0.8
    overhead_s: float = 10.0  # per run, outside its timed loop: start-up, data, diagnostics


@dataclass(frozen=True)
class SettingStats:
    """One pilot setting: the paired differences and what they imply."""

    name: str
    description: str
    tokens: int
    sublayers: int
    diffs: dict[int, float]
    paired: PairedDiff | None
    sd: float
    sd_upper: float
    run_seconds: float  # mean wall time of one run (prenorm and block alike, one thread), with overhead
    seeds: int | None  # needed at the point estimate of sd
    seeds_upper: int | None  # needed at its upper confidence bound
    affordable: int  # the most seeds E1 can afford at this setting
    finite: bool

    def e1_hours(self, rule: PilotRule, seeds: int | None) -> float:
        """E1's wall time at ``seeds`` seeds: ``seeds × arms × run_seconds / parallel``."""
        return math.inf if seeds is None else seeds * rule.arms * self.run_seconds / rule.parallel / 3600


def setting_stats(
    name: str, runs: Sequence[Run], rule: PilotRule, baseline: str, variant: str
) -> SettingStats:
    base, other = _losses(runs, baseline), _losses(runs, variant)
    seeds = sorted(set(base) & set(other))
    diffs = {s: other[s] - base[s] for s in seeds}
    finite = _finite(base) and _finite(other)
    # a diverged run (NaN loss) has no interval; statistics.stdev raises on NaN instead of returning it
    paired = paired_difference(other, base) if finite else None
    sd = statistics.stdev(diffs.values()) if len(diffs) > 1 and finite else math.nan
    secs = [float(r.result["seconds"]) for r in runs if r.variant in (baseline, variant)]
    secs = [s for s in secs if math.isfinite(s)]
    run_seconds = statistics.fmean(secs) + rule.overhead_s if secs else math.nan
    cfg = next((r.config for r in runs if r.config), {})
    m = cfg.get("model", {})
    tokens = int(runs[0].result["train_tokens"])
    per_seed_hours = rule.arms * run_seconds / rule.parallel / 3600
    affordable = int(rule.budget_hours // per_seed_hours) if per_seed_hours > 0 else 0
    kw = {"power": rule.power, "level": rule.level, "min_seeds": rule.min_seeds}
    sd_upper = sd_upper_bound(sd, len(diffs), rule.sd_confidence)
    return SettingStats(
        name=name,
        description=describe_config(cfg),
        tokens=tokens,
        sublayers=2 * int(m.get("n_layers", 0)),
        diffs=diffs,
        paired=paired,
        sd=sd,
        sd_upper=sd_upper,
        run_seconds=run_seconds,
        seeds=seeds_needed(rule.delta, sd, **kw),
        seeds_upper=seeds_needed(rule.delta, sd_upper, **kw),
        affordable=affordable,
        finite=finite,
    )


@dataclass(frozen=True)
class PilotChoice:
    """What the rule chose: a setting and a seed count, and why in words."""

    setting: str | None
    seeds: int | None
    reason: str


def choose(stats: Sequence[SettingStats], rule: PilotRule) -> PilotChoice:
    """Apply the pilot's decision rule (see ``experiments/pilot/protocol.md``).

    Only the spread of the paired differences and the cost enter it, never the observed mean
    difference, so the choice cannot favour a setting where Block happened to win.
    """
    eligible = [s for s in stats if s.finite and len(s.diffs) >= rule.min_pairs and math.isfinite(s.sd)]
    if not eligible:
        return PilotChoice(None, None, f"no setting has {rule.min_pairs} finished, finite seed pairs yet")
    feasible = [s for s in eligible if s.seeds is not None and s.e1_hours(rule, s.seeds) <= rule.budget_hours]
    if feasible:
        cheapest = min(s.e1_hours(rule, s.seeds) for s in feasible)
        tied = [s for s in feasible if s.e1_hours(rule, s.seeds) <= cheapest * rule.tie]
        pick = max(tied, key=lambda s: (s.tokens, s.sublayers, s.name))
        upper = pick.seeds_upper if pick.seeds_upper is not None else pick.affordable
        seeds = max(pick.seeds, min(upper, pick.affordable))
        why = (
            f"Setting {pick.name} reaches {rule.power:.0%} power at δ = {rule.delta} with {pick.seeds} seeds "
            f"(sd {pick.sd:.4f}), for an E1 of {pick.e1_hours(rule, pick.seeds):.2f} h, the cheapest within "
            f"the {rule.budget_hours:g} h budget"
            + (
                f" (tied within {rule.tie:g}× with {', '.join(s.name for s in tied if s is not pick)}; "
                "more tokens per run, then more sublayers, break the tie)"
                if len(tied) > 1
                else ""
            )
            + f". Seeds: the count at the sd's {rule.sd_confidence:.0%} upper bound "
            f"({pick.seeds_upper if pick.seeds_upper is not None else 'more than 1000'}) as far as "
            f"the budget affords ({pick.affordable}), and never fewer than {pick.seeds}: {seeds} seeds, "
            f"E1 ≈ {pick.e1_hours(rule, seeds):.2f} h."
        )
        return PilotChoice(pick.name, seeds, why)

    # nothing reaches the target within budget: the setting that detects the smallest difference
    # at the seeds it can afford
    def mde(s: SettingStats) -> float:
        return detectable_difference(s.sd, max(s.affordable, rule.min_seeds), rule.power, rule.level)

    pick = min(eligible, key=lambda s: (mde(s), -s.tokens, s.name))
    seeds = max(pick.affordable, rule.min_seeds)
    why = (
        f"No setting reaches {rule.power:.0%} power at δ = {rule.delta} within the {rule.budget_hours:g} h "
        f"budget; setting {pick.name} detects the smallest difference at the seeds it affords: "
        f"{mde(pick):.4f} nats with {seeds} seeds (E1 ≈ {pick.e1_hours(rule, seeds):.2f} h). "
        f"E1's protocol must say that it is powered for differences of {mde(pick):.3f} nats, "
        f"not {rule.delta}."
    )
    return PilotChoice(pick.name, seeds, why)


def _plot_pilot(stats: Sequence[SettingStats], path: Path, delta: float, variant: str, baseline: str) -> None:
    from attnres.analysis.plots import PALETTE, plt, save_figure

    fig, ax = plt.subplots(figsize=(1.6 * len(stats) + 3, 4))
    for i, s in enumerate(stats):
        xs = [i + 0.08 * (j - (len(s.diffs) - 1) / 2) for j in range(len(s.diffs))]
        ax.scatter(
            xs, list(s.diffs.values()), color=PALETTE[2], s=18, zorder=3, label="one seed" if i == 0 else None
        )
        if s.paired is not None and s.paired.n >= 2:
            ax.errorbar(
                [i + 0.3],
                [s.paired.mean],
                yerr=[[s.paired.mean - s.paired.low], [s.paired.high - s.paired.mean]],
                fmt="o",
                color=PALETTE[0],
                capsize=4,
                label="mean, 95% t interval" if i == 0 else None,
            )
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.axhline(-delta, color=PALETTE[4], linewidth=0.8, linestyle="--", label=f"−{delta} (the target)")
    ax.set_xticks(range(len(stats)), [s.name for s in stats])
    ax.set_xlim(-0.5, len(stats) - 0.3)
    ax.set_ylabel(f"val loss, {variant} − {baseline} (nats)")
    ax.set_title("pilot: paired differences by setting")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=9)
    save_figure(fig, path, dpi=110)


def pilot_report(
    root: str | Path, rule: PilotRule | None = None, baseline: str = "prenorm", variant: str = "block"
) -> Path:
    """Write ``root/report.md`` (and ``paired_differences.png``) for the pilot in ``root/runs/``, and
    the decision as ``root/choice.json`` (``setting``, ``seeds``, ``reason``; nulls until it can decide)."""
    rule = rule or PilotRule()
    root = Path(root)
    groups = load_groups(root)
    stats = [setting_stats(name, runs, rule, baseline, variant) for name, runs in groups.items()]
    choice = choose(stats, rule)
    lines = [
        "# Pilot: the seed spread of the paired difference Block − PreNorm",
        "",
        "Generated by `experiments/pilot/analyze` from the committed `runs/*/*/result.json` and "
        "`config.json`; the question, the settings and the decision rule are in "
        "[`protocol.md`](protocol.md), fixed before the runs.",
        "",
        "## Settings",
        "",
        "| setting | what | pairs | " + f"{baseline} val loss | {variant} val loss | "
        f"{variant} − {baseline} [95% t CI] | sd of the difference "
        f"| sd, {rule.sd_confidence:.0%} upper bound "
        "| s per run |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for s, runs in zip(stats, groups.values(), strict=True):
        lines.append(
            f"| {s.name} | {s.description} | {len(s.diffs)} | {_loss_cell(_losses(runs, baseline))} "
            f"| {_loss_cell(_losses(runs, variant))} | {_fmt_diff(s.paired)} | {_fmt(s.sd)} "
            f"| {_fmt(s.sd_upper)} "
            f"| {_fmt(s.run_seconds, 0)} |"
        )
    lines += [
        "",
        "The mean difference is shown for completeness: the pilot is not powered to estimate it, and it "
        "does not enter the decision. s per run: the mean `seconds` of the setting's runs (one thread "
        f"each, two runs at a time) plus {rule.overhead_s:g} s of start-up outside the timed loop.",
        "",
        f"## Seeds needed to show a true difference of {rule.delta} nats",
        "",
        f"Power = P(the 95% paired t interval lies wholly below zero | true difference −{rule.delta}) = "
        f"P(T'(n−1, λ) > t(0.975, n−1)), λ = {rule.delta}·√n / sd, noncentral t computed exactly. "
        f"Seeds needed: the fewest n ≥ {rule.min_seeds} with power ≥ {rule.power:.0%}. "
        f"E1 cost: n × {rule.arms} arms × s per run / {rule.parallel} runs at a time.",
        "",
        "| setting | seeds needed (sd) | seeds needed (sd upper bound) | power at 5 seeds | "
        "detectable at 5 seeds | detectable at 10 seeds | E1 hours at the seeds needed | seeds E1 affords "
        f"in {rule.budget_hours:g} h |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in stats:
        lines.append(
            f"| {s.name} | {s.seeds if s.seeds is not None else '> 1000'} "
            f"| {s.seeds_upper if s.seeds_upper is not None else '> 1000'} "
            f"| {_fmt(paired_power(rule.delta, s.sd, 5, rule.level), 2)} "
            f"| {_fmt(detectable_difference(s.sd, 5, rule.power, rule.level))} "
            f"| {_fmt(detectable_difference(s.sd, 10, rule.power, rule.level))} "
            f"| {_fmt(s.e1_hours(rule, s.seeds), 2)} | {s.affordable} |"
        )
    lines += ["", "## Per seed", "", f"{variant} − {baseline}, validation loss, by seed:", ""]
    all_seeds = sorted({seed for s in stats for seed in s.diffs})
    lines += [
        "| setting | " + " | ".join(f"seed {k}" for k in all_seeds) + " |",
        "|---|" + "---:|" * len(all_seeds),
    ]
    for s in stats:
        cells = [f"{s.diffs[k]:+.4f}" if k in s.diffs else "n/a" for k in all_seeds]
        lines.append(f"| {s.name} | " + " | ".join(cells) + " |")
    _plot_pilot(stats, root / "paired_differences.png", rule.delta, variant, baseline)
    lines += ["", "![paired differences](paired_differences.png)", "", "## Decision", ""]
    if choice.setting is None:
        lines += [f"None yet: {choice.reason}.", ""]
    else:
        lines += [f"**Setting {choice.setting}, {choice.seeds} seeds.** {choice.reason}", ""]
    path = root / "report.md"
    path.write_text("\n".join(lines))
    choice_record = {"setting": choice.setting, "seeds": choice.seeds, "reason": choice.reason}
    (root / CHOICE_FILE).write_text(json.dumps(choice_record, indent=2) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# The learning-rate sweep


DIVERGED_SUFFIX = ".diverged"


def _lr(run: Run) -> float:
    return float(run.config["optim"]["lr"]) if run.config else math.nan


@dataclass
class Sweep:
    """A learning-rate sweep's finished runs: ``losses[variant, lr] = {seed: loss}``, and the
    ``(variant, lr)`` cells where a run diverged (a ``<variant>.diverged`` marker in the group)."""

    variants: list[str]
    rates: list[float]
    losses: dict[tuple[str, float], dict[int, float]]
    diverged: set[tuple[str, float]]
    config: dict[str, Any]

    def best(self, variant: str) -> float | None:
        """The rate with the lowest mean loss over the seeds that every rate of ``variant`` has (so
        seeds added later at one rate do not move the choice); a rate where a run diverged never is."""
        tried = [
            lr
            for lr in self.rates
            if (variant, lr) not in self.diverged
            and self.losses.get((variant, lr))
            and _finite(self.losses[variant, lr])
        ]
        if not tried:
            return None
        common = set.intersection(*(set(self.losses[variant, lr]) for lr in tried))
        if not common:
            return None

        def mean_common(lr: float) -> float:
            return statistics.fmean(self.losses[variant, lr][s] for s in sorted(common))

        return min(tried, key=mean_common)

    def next_rates(self, grid: Sequence[float], factor: float = 2.0, extensions: int = 2) -> list[float]:
        """Rates to add because a variant's best is on the edge of what was run: the next rate out
        (``factor`` apart), at most ``extensions`` beyond ``grid`` on each side."""
        out = []
        low_limit = min(grid) / factor**extensions * (1 - 1e-9)
        high_limit = max(grid) * factor**extensions * (1 + 1e-9)
        for v in self.variants:
            b = self.best(v)
            if b is None or len(self.rates) < 2:
                continue
            if b == self.rates[0] and b / factor >= low_limit:
                out.append(b / factor)
            if b == self.rates[-1] and b * factor <= high_limit:
                out.append(b * factor)
        return sorted({float(f"{r:.6g}") for r in out} - set(self.rates))


def load_sweep(root: str | Path, baseline: str = "prenorm") -> Sweep:
    """The sweep under ``root/runs/<group>/``; each run's rate is read from its ``config.json``."""
    root = Path(root)
    runs = [r for group in load_groups(root).values() for r in group]
    if any(not r.config for r in runs):
        raise FileNotFoundError(
            "every run of a sweep needs its config.json (the learning rate is read there)"
        )
    losses: dict[tuple[str, float], dict[int, float]] = {}
    for r in runs:
        losses.setdefault((r.variant, _lr(r)), {})[r.seed] = r.loss
    diverged = set()
    for marker in sorted((root / RUNS_DIR).glob(f"*/*{DIVERGED_SUFFIX}")):
        info = json.loads(marker.read_text())
        diverged.add((info["variant"], float(info["lr"])))
    rates = sorted({lr for _, lr in losses} | {lr for _, lr in diverged})
    names = {r.variant for r in runs} | {v for v, _ in diverged}
    variants = [baseline, *sorted(names - {baseline})] if baseline in names else sorted(names)
    return Sweep(variants, rates, losses, diverged, runs[0].config)


def _sweep_cell(sweep: Sweep, variant: str, lr: float) -> str:
    if (variant, lr) in sweep.diverged:
        return "diverged"
    values = sweep.losses.get((variant, lr), {})
    if values and not _finite(values):
        return "diverged"
    return _loss_cell(values)


def _paired(a: dict[int, float], b: dict[int, float]) -> str:
    if not a or not b or not (_finite(a) and _finite(b)):
        return "n/a"
    return _fmt_diff(paired_difference(a, b))


def lr_sweep_report(root: str | Path, baseline: str = "prenorm") -> Path:
    """Write ``root/report.md`` (and ``lr_sweep.png``) for a sweep in ``root/runs/<group>/``: one
    group per learning rate (read from each run's ``config.json``). Reports every variant at each
    rate, each variant at its own best rate, and every variant at the baseline's best rate."""
    root = Path(root)
    sweep = load_sweep(root, baseline)
    variants, rates = sweep.variants, sweep.rates
    bests = {v: sweep.best(v) for v in variants}
    lines = [
        "# Learning-rate sweep",
        "",
        "Generated by `experiments/lr_sweep/analyze` from the committed runs; the design is in "
        "[`protocol.md`](protocol.md).",
        "",
        f"Setting: {describe_config(sweep.config).rsplit(', lr', 1)[0]}.",
        "",
        "## Validation loss at each rate",
        "",
        "| lr | " + " | ".join(variants) + " |",
        "|---:|" + "---:|" * len(variants),
    ]
    for lr in rates:
        cells = []
        for v in variants:
            cell = _sweep_cell(sweep, v, lr)
            cells.append(f"**{cell}**" if bests[v] == lr else cell)
        lines.append(f"| {lr:g} | " + " | ".join(cells) + " |")
    edge = [
        v for v in variants if bests[v] is not None and len(rates) > 1 and bests[v] in (rates[0], rates[-1])
    ]
    lines += [
        "",
        "Bold: each variant's best rate: the lowest mean over the seeds that every rate has (a rate "
        "where a run diverged never is). The best rates may have more seeds than the others (protocol).",
    ]
    if edge:
        lines += [f"**On the edge of the grid:** {', '.join(edge)}: the best rate may lie outside it."]
    b_star = bests.get(baseline)
    base_best = sweep.losses.get((baseline, b_star), {}) if b_star is not None else {}
    lines += [
        "",
        "## Side by side",
        "",
        f"| variant | own best lr | val loss at own best | − {baseline} at its best [95% t CI] "
        f"| val loss at {baseline}'s best ({'n/a' if b_star is None else f'{b_star:g}'}) "
        f"| − {baseline} at that rate [95% t CI] |",
        "|---|---:|---:|---|---:|---|",
    ]
    for v in variants:
        own = bests[v]
        own_losses = sweep.losses.get((v, own), {}) if own is not None else {}
        at_base = sweep.losses.get((v, b_star), {}) if b_star is not None else {}
        own_diff = "(baseline)" if v == baseline else _paired(own_losses, base_best)
        base_diff = "(baseline)" if v == baseline else _paired(at_base, base_best)
        at_base_cell = _sweep_cell(sweep, v, b_star) if b_star is not None else "n/a"
        lines.append(
            f"| {v} | {'n/a' if own is None else f'{own:g}'} | {_loss_cell(own_losses)} | {own_diff} "
            f"| {at_base_cell} | {base_diff} |"
        )
    lines += [
        "",
        "Differences are paired by seed (the same seed gives the same initial weights of the shared "
        "modules and the same data order, whatever the rate).",
        "",
    ]
    _plot_sweep(sweep, root / "lr_sweep.png")
    lines += ["![validation loss against learning rate](lr_sweep.png)", ""]
    path = root / "report.md"
    path.write_text("\n".join(lines))
    return path


def _plot_sweep(sweep: Sweep, path: Path) -> None:
    from attnres.analysis.plots import plt, save_figure, variant_styles

    styles = variant_styles(sweep.variants)
    fig, ax = plt.subplots(figsize=(7, 4))
    for v in sweep.variants:
        xs = [lr for lr in sweep.rates if sweep.losses.get((v, lr)) and _finite(sweep.losses[v, lr])]
        vals = [list(sweep.losses[v, lr].values()) for lr in xs]
        means = [statistics.fmean(x) for x in vals]
        ax.errorbar(
            xs,
            means,
            yerr=[
                [m - min(x) for m, x in zip(means, vals, strict=True)],
                [max(x) - m for m, x in zip(means, vals, strict=True)],
            ],
            marker="o",
            capsize=3,
            label=v,
            **styles[v].kw(),
        )
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final validation loss (mean, min–max over seeds)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=9)
    save_figure(fig, path, dpi=110)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m attnres.analysis.experiments", description="Reports of the experiments/ folders."
    )
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("pilot", help="the pilot: seed spread of block − prenorm, seeds needed, the choice")
    p.add_argument("dir", help="the pilot's folder (holding runs/<setting>/<variant>-s<seed>/)")
    p = sub.add_parser("lr-sweep", help="the learning-rate sweep: each variant at its own and prenorm's best")
    p.add_argument("dir", help="the sweep's folder (holding runs/<group>/<variant>-s<seed>/)")
    p.add_argument(
        "--next",
        metavar="GRID",
        help="instead of a report: print the rates to add (one a line) because a variant's best is on the "
        "edge of what ran, for the comma-separated base GRID (at most two steps of 2x beyond it)",
    )
    p.add_argument("--best", action="store_true", help="instead of a report: print 'variant lr' per variant")
    args = parser.parse_args(argv)
    if args.what == "pilot":
        print(f"report: {pilot_report(args.dir)}")
    elif args.next:
        grid = [float(x) for x in args.next.split(",")]
        for lr in load_sweep(args.dir).next_rates(grid):
            print(f"{lr:g}")
    elif args.best:
        sweep = load_sweep(args.dir)
        for v in sweep.variants:
            b = sweep.best(v)
            print(f"{v} {'none' if b is None else f'{b:g}'}")
    else:
        print(f"report: {lr_sweep_report(args.dir)}")


if __name__ == "__main__":
    main()
