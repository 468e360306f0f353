"""``attnres <verb>``: thin wrappers over library functions.

A training config is built in layers: the preset (``--preset``, default ``quick``), then a config
file (``--config FILE``, JSON or YAML, complete or partial: keys it leaves out keep the preset's
values), then dotted flags ``--section.key=value`` (or ``--section.key value``), each checked
against the config's fields and types. ``--print-config`` prints the result and exits; ``--help``
lists every key, from the config dataclasses' docstrings, and the presets.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

from attnres.configs import ConfigError, apply_dict, apply_overrides, describe_keys, load_config_file

if TYPE_CHECKING:
    from attnres.storage.config import TrainConfig


def parse_overrides(extra: list[str]) -> dict[str, str]:
    """Dotted override flags to a dict.

    ``["--model.d_model=64", "--train.steps", "10"]`` -> ``{"model.d_model": "64", "train.steps": "10"}``
    """
    overrides: dict[str, str] = {}
    i = 0
    while i < len(extra):
        arg = extra[i]
        if not arg.startswith("--") or "." not in arg:
            raise ConfigError(f"unexpected argument {arg!r}; config overrides look like --section.key=value")
        key, sep, value = arg[2:].partition("=")
        if not sep:
            if i + 1 >= len(extra):
                raise ConfigError(f"{arg} needs a value: {arg}=VALUE")
            value, i = extra[i + 1], i + 1
        overrides[key] = value
        i += 1
    return overrides


DEFAULT_PRESET = "quick"


def _config(args: argparse.Namespace, extra: list[str], base: TrainConfig | None = None) -> TrainConfig:
    """The layered config: ``--preset`` (else ``base``, else the default preset), then the
    ``--config`` file, then the ``--section.key=value`` flags in ``extra``."""
    from attnres.train import get_preset

    if args.preset or base is None:
        base = get_preset(args.preset or DEFAULT_PRESET)
    if args.config:
        data = load_config_file(args.config)  # its errors name the file
        try:
            base = apply_dict(base, data)
        except ConfigError as e:
            raise ConfigError(f"--config {args.config}: {e}") from None
    return apply_overrides(base, parse_overrides(extra))


def _print_config(cfg: TrainConfig) -> None:
    print(json.dumps(dataclasses.asdict(cfg), indent=2))


def cmd_train(args: argparse.Namespace, extra: list[str]) -> None:
    import torch.distributed as dist

    from attnres.storage.checkpoint import run_config
    from attnres.storage.config import RESUME_MAY_CHANGE, resume_conflicts
    from attnres.train import train

    if args.resume:
        cfg = run_config(args.out)
        if args.preset or args.config or extra:
            requested = _config(args, extra, base=cfg)
            diff = resume_conflicts(cfg, requested)
            if diff:
                raise ConfigError(
                    f"--resume continues the saved run; it cannot change {', '.join(diff)}. On resume only "
                    f"{', '.join(sorted(k for k in RESUME_MAY_CHANGE if k.startswith('train.')))} and "
                    "parallel.* may differ; start a new run (another --out) to change the rest"
                )
            cfg = dataclasses.replace(cfg, train=requested.train, parallel=requested.parallel)
    else:
        cfg = _config(args, extra)
    if args.print_config:
        _print_config(cfg)
        return
    group_was_ours = not dist.is_initialized()  # a caller's own group is left to the caller
    result = train(cfg, args.out, resume=args.resume)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 alone reports
        print(
            f"final validation loss {result.final_val_loss:.4f} after {result.steps} steps "
            f"({result.tokens_per_s:,.0f} tokens/s, {result.seconds:.1f} s); run in {args.out}"
        )
    if group_was_ours and dist.is_initialized():  # torchrun: leave together, skip the teardown
        from attnres.distributed.launch import exit_process_group

        exit_process_group()


def cmd_compare(args: argparse.Namespace, extra: list[str]) -> None:
    from attnres.analysis.results import summary_table
    from attnres.train.compare import check_residual_options, compare, parse_variants

    overridden = {"model.residual.variant", "train.seed"} & set(parse_overrides(extra))
    if overridden:  # compare sets both per run; the flag would be dropped without a word
        raise ConfigError(
            f"attnres compare sets {', '.join(sorted(overridden))} itself: choose variants with "
            "--variants and the number of seeds (0 … N-1) with --seeds"
        )
    # residual options go to the variants that have them (each variant has its own options)
    flags = parse_overrides(extra)
    residual = {
        k.removeprefix("model.residual."): v for k, v in flags.items() if k.startswith("model.residual.")
    }
    rest = [f"--{k}={v}" for k, v in flags.items() if not k.startswith("model.residual.")]
    variants = parse_variants(args.variants)
    check_residual_options(variants, residual)
    cfg = _config(args, rest)
    if args.print_config:  # the shared config; compare sets the variant and the seed of each run
        _print_config(cfg)
        return
    results = compare(cfg, variants, args.seeds, args.out, jobs=args.jobs, residual=residual)
    print()
    print(summary_table(results))
    print(f"\nsummary: {args.out}/summary.json   curves: {args.out}/loss_curves.png")


def cmd_convert(args: argparse.Namespace, extra: list[str]) -> None:
    try:
        from attnres.hf.convert import from_hf, to_hf
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            f"attnres convert needs the hf extra: pip install 'attnres[hf]' ({e})"
        ) from None
    if extra:
        raise ValueError(f"unexpected arguments: {' '.join(extra)}")
    out = to_hf(args.src, args.out) if args.to_hf else from_hf(args.src, args.out)
    print(f"wrote {out}")


def cmd_report(args: argparse.Namespace, extra: list[str]) -> None:
    from attnres.analysis.report import write_report

    print(f"report: {write_report(args.dir)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnres", description="Attention Residuals: train, compare, inspect."
    )
    sub = parser.add_subparsers(dest="verb", required=True)

    p = sub.add_parser(
        "train",
        help="train one model",
        description="Train one model. The config is the preset, then --config FILE, then the "
        "--section.key=value flags (e.g. --model.residual.variant=full).",
        epilog=config_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_arguments(p)
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its checkpoint (its saved config, with any changes "
        "--preset, --config or flags make to the keys a resume may change)",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "compare",
        help="train several variants on identical data and seeds",
        description="Train several variants on identical data and seeds; the shared config is built "
        "as for attnres train.",
        epilog=config_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_arguments(p)
    p.add_argument("--variants", default="prenorm,block,full", help="comma-separated names, or 'all'")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument(
        "--jobs", type=int, default=1, help="runs trained in parallel (each gets cores/jobs threads)"
    )
    p.add_argument("--out", required=True, help="directory of the runs, the summary and the curves")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("sample", help="stream text generated by a trained checkpoint")
    _add_arguments("attnres.sample", p)
    p.set_defaults(func=lambda args, extra: _run("attnres.sample", args, extra))

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    p = bench.add_parser("infer", help="prefill, decode and memory cost of AttnRes vs prenorm (CPU)")
    _add_arguments("attnres.bench.infer", p)
    p.set_defaults(func=lambda args, extra: _run("attnres.bench.infer", args, extra))
    for verb, text in (
        ("ops", "depth-read implementations vs the reference"),
        ("train", "train step vs prenorm"),
        ("memory", "activation memory of a train step under activation checkpointing (CPU)"),
    ):
        p = bench.add_parser(verb, help=text)
        _add_arguments(f"attnres.bench.{verb}", p)
        p.set_defaults(func=lambda args, extra, verb=verb: _run(f"attnres.bench.{verb}", args, extra))
    from attnres.bench.pipeline import register_pipeline_bench

    p = register_pipeline_bench(bench)
    pipeline_main = p.get_default("func")  # takes only the parsed arguments
    p.set_defaults(func=lambda args, extra: pipeline_main(args))

    p = sub.add_parser("convert", help="convert a checkpoint to or from a Hugging Face transformers dir")
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument("--to-hf", action="store_true", help="SRC: our run or checkpoint dir")
    way.add_argument("--from-hf", action="store_true", help="SRC: a transformers AttnRes dir")
    p.add_argument("src")
    p.add_argument("out")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("report", help="write report.md with plots for a run or compare directory")
    p.add_argument("dir", help="the --out of attnres train or attnres compare")
    p.set_defaults(func=cmd_report)
    return parser


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``--preset``, ``--config`` and ``--print-config`` of ``train`` and ``compare``."""
    parser.add_argument("--preset", default=None, help=f"preset name (default: {DEFAULT_PRESET}; see below)")
    parser.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="a JSON or YAML (needs PyYAML) config file laid over the preset: a run's config.json, "
        "or a partial one; flags apply on top",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config as JSON and exit"
    )


def config_help(width: int = 100) -> str:
    """``--help``'s list of every config key (type, default, one-line doc) and of the presets.

    Built from the config dataclasses' ``Attributes:`` docstrings (:func:`describe_keys`) and the
    preset functions' docstrings, so it cannot drift from the code.
    """
    from attnres.residuals import ResidualConfig, variant_names
    from attnres.train.presets import PRESETS, get_preset

    lines = [f"config keys (--section.key=value; default: the value in --preset {DEFAULT_PRESET}):"]
    for key in describe_keys(get_preset(DEFAULT_PRESET)):
        lines.append(f"  {key.key} ({key.type}, default {key.default!r})")
        if key.doc:
            lines += textwrap.wrap(key.doc, width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    lines += ["", "residual options by variant (--model.residual.variant=NAME --model.residual.KEY=VALUE):"]
    for variant in variant_names():
        keys = describe_keys(ResidualConfig(variant=variant))
        options = [k for k in keys if k.key not in ("variant", "impl")]
        lines.append(f"  {variant}:" + ("" if options else " no options"))
        for key in options:
            lines.append(f"    {key.key} ({key.type}, default {key.default!r})")
            if key.doc:
                lines += textwrap.wrap(key.doc, width, initial_indent=" " * 8, subsequent_indent=" " * 8)
    lines += ["", "presets (--preset NAME):"]
    for name, fn in PRESETS.items():
        doc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        lines += textwrap.wrap(f"{name}: {doc}", width, initial_indent="  ", subsequent_indent=" " * 6)
    return "\n".join(lines)


def _add_arguments(module: str, parser: argparse.ArgumentParser) -> None:
    import importlib

    importlib.import_module(module).add_arguments(parser)


def _run(module: str, args: argparse.Namespace, extra: list[str]) -> None:
    import importlib

    if extra:
        raise ValueError(f"unrecognized arguments: {' '.join(extra)}")
    importlib.import_module(module).main(args)


#: errors whose message says what to fix: printed as one line (anything else keeps its traceback)
USER_ERRORS = (ConfigError, ValueError, FileNotFoundError, FileExistsError, ModuleNotFoundError)


def _disk_full(e: Exception) -> bool:
    """Whether ``e`` is a write that failed for want of space."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(e)
    # safetensors wraps the OSError; checkpoints write torch's trainer state as plain bytes
    return "No space left on device" in text or "os error 28" in text


def environment_error(e: Exception, out: str | None) -> str | None:
    """A one-line message for an error of the machine rather than the code, else ``None``.

    Covers a full disk (saying whether the run directory ``out`` still holds its previous
    checkpoint) and a file the process may not touch (permissions, a read-only file system).
    """
    filename = getattr(e, "filename", None)
    if _disk_full(e):
        message = "no space left on device" + (f" writing {filename}" if filename else "")
        from attnres.storage.checkpoint import has_checkpoint

        if out and Path(out).is_dir() and has_checkpoint(out):
            return f"{message}; the previous checkpoint in {out} is kept: free some space, then pass --resume"
        return f"{message}; free some space and run again"
    if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{e.strerror}: {filename}" if filename else str(e)
    return None


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``attnres`` console script.

    A user's mistake (a bad flag, path or environment variable) or the machine's (a full disk) is
    one line on stderr and exit status 2; a bug keeps its traceback.
    """
    prog, args = "attnres", None
    try:
        parser = build_parser()  # imports the verbs' modules, which check ATTNRES_KERNELS
        args, extra = parser.parse_known_args(argv)
        prog = f"attnres {args.verb}"
        args.func(args, extra)
        return
    except USER_ERRORS as e:
        message = str(e)
    except KeyboardInterrupt as e:  # a run stopped by Ctrl-C/SIGTERM says what it saved (TrainingInterrupted)
        print(f"{prog}: {e or 'interrupted'}", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        found = environment_error(e, getattr(args, "out", None))
        if found is None:
            raise
        message = found
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
