"""``attnres <verb>``: thin wrappers over library functions.

Config overrides are dotted flags, ``--section.key=value`` (or ``--section.key value``), checked
against the config's fields and types.
"""

from __future__ import annotations

import argparse
import sys

from attnres.configs import ConfigError, apply_overrides


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


def _config(preset: str, extra: list[str]):
    from attnres.train import get_preset

    return apply_overrides(get_preset(preset), parse_overrides(extra))


def cmd_train(args: argparse.Namespace, extra: list[str]) -> None:
    import dataclasses

    from attnres.train import train
    from attnres.train.checkpoint import load_config

    if args.resume:
        cfg = load_config(args.out)
        if args.preset or extra:
            wanted = _config(args.preset or "quick", extra)
            diff = _diff(
                dataclasses.asdict(cfg), dataclasses.asdict(wanted), ignore={"train.steps", "train.progress"}
            )
            if args.preset and diff:
                raise ConfigError(
                    f"--resume: the saved config differs from the requested one at {', '.join(diff)}"
                )
            cfg = (
                dataclasses.replace(cfg, train=wanted.train)
                if args.preset
                else apply_overrides(cfg, parse_overrides(extra))
            )
    else:
        cfg = _config(args.preset or "quick", extra)
    result = train(cfg, args.out, resume=args.resume)
    print(
        f"final validation loss {result.final_val_loss:.4f} after {result.steps} steps "
        f"({result.tokens_per_s:,.0f} tokens/s, {result.seconds:.1f} s); run in {args.out}"
    )


def _diff(a: dict, b: dict, ignore: set[str], prefix: str = "") -> list[str]:
    out = []
    for k in a:
        key = prefix + k
        if isinstance(a[k], dict):
            out += _diff(a[k], b[k], ignore, key + ".")
        elif a[k] != b[k] and key not in ignore:
            out.append(key)
    return out


def cmd_compare(args: argparse.Namespace, extra: list[str]) -> None:
    from attnres.train.compare import compare, parse_variants, summary_table

    cfg = _config(args.preset, extra)
    results = compare(cfg, parse_variants(args.variants), args.seeds, args.out)
    print()
    print(summary_table(results))
    print(f"\nsummary: {args.out}/summary.json   curves: {args.out}/loss_curves.png")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnres", description="Attention Residuals: train, compare, inspect."
    )
    sub = parser.add_subparsers(dest="verb", required=True)

    p = sub.add_parser(
        "train",
        help="train one model",
        description="Train one model. Extra flags "
        "--section.key=value override the preset (e.g. --model.residual.variant=full).",
    )
    p.add_argument("--preset", default=None, help="preset name (default: quick)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("compare", help="train several variants on identical data and seeds")
    p.add_argument("--preset", default="quick")
    p.add_argument("--variants", default="prenorm,block,full", help="comma-separated names, or 'all'")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_compare)

    from attnres.bench import register_bench

    register_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``attnres`` console script."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        args.func(args, extra)
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError, ModuleNotFoundError) as e:
        print(f"attnres {args.verb}: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
