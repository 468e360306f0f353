"""Sample text from a trained checkpoint: the library behind ``attnres sample``."""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from attnres.model import Transformer
from attnres.model.generate import SamplingConfig, stream
from attnres.storage.checkpoint import CheckpointError, load_checkpoint_tokenizer, load_model


def load_for_sampling(path: str | Path) -> tuple[Transformer, Any]:
    """The model (eval mode) and tokenizer saved by ``attnres train``.

    Args:
        path: the run directory or its ``checkpoint/`` directory.

    Raises:
        CheckpointError: naming the path and what is wrong, for a missing directory, a missing,
            truncated or mismatched weights file, or weights that hold NaN or inf.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(
            f"checkpoint directory {str(path)!r} does not exist; pass the output directory of "
            "`attnres train` (or its checkpoint/ subdirectory)"
        )
    try:
        model, _ = load_model(path)
        tokenizer = load_checkpoint_tokenizer(path)
    except (ValueError, FileNotFoundError) as err:  # the loaders' own messages name the fix
        raise CheckpointError(str(err)) from err
    except Exception as err:  # safetensors, json and torch each raise their own types
        raise CheckpointError(
            f"could not load the checkpoint in {str(path)!r}: {type(err).__name__}: {err}. The files may be "
            "truncated or from another version; re-save it with `attnres train`, or point to another run"
        ) from err
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not t.isfinite().all()]
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise CheckpointError(
            f"the checkpoint in {str(path)!r} holds NaN/inf weights ({shown}); the run probably "
            "diverged: sample from an earlier checkpoint, or retrain"
        )
    return model.eval(), tokenizer


def check_text(prompt: str) -> None:
    """Raise a ValueError unless ``prompt`` is valid Unicode text that encodes to UTF-8.

    Command-line arguments that are not valid UTF-8 reach Python as lone surrogates
    (``'\\udcff'`` for the byte ``0xff``), which no tokenizer can encode.
    """
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as err:
        code = ord(prompt[err.start])
        what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"lone surrogate U+{code:04X}"
        raise ValueError(
            f"the prompt is not valid UTF-8 text ({what} at character {err.start}); pass it as UTF-8, "
            "e.g. convert it with iconv"
        ) from None


def stream_text(
    model: Transformer,
    tokenizer: Any,
    prompt: str,
    max_new_tokens: int | None = None,
    sampling: SamplingConfig | None = None,
    compile: bool = False,
) -> Iterator[str]:
    """Yield the continuation of ``prompt`` piece by piece as tokens are generated.

    Generation stops at the tokenizer's end-of-text token (not yielded) or after ``max_new_tokens``
    (``None``: as many as fit in the context); ``compile`` compiles the decode steps
    (:func:`attnres.model.generate.stream`). Text is decoded from all tokens so far and only the
    new suffix is yielded, so a character split across byte tokens appears once it is complete.
    """
    check_text(prompt)
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError("the prompt is empty (it encodes to no tokens); give at least one character")
    if max_new_tokens is None:
        max_new_tokens = max(0, model.cfg.seq_len - len(ids))
    eos = getattr(tokenizer, "eos_id", None)
    stop = [] if eos is None else [eos]
    new: list[int] = []
    shown = ""
    for step in stream(model, [ids], max_new_tokens, sampling, stop_tokens=stop, compile=compile):
        token = int(step[0])
        if token < 0 or token in stop:
            break
        new.append(token)
        text = tokenizer.decode(new)
        if not text.endswith("\ufffd"):  # wait for the rest of a split multi-byte character
            yield text[len(shown) :]
            shown = text
    text = tokenizer.decode(new)
    if text != shown:
        yield text[len(shown) :]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``attnres sample``."""
    parser.add_argument("--ckpt", required=True, help="run directory of `attnres train`, or its checkpoint/")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument(
        "--max-new-tokens", type=int, default=None, help="default: fill the model's context (seq_len)"
    )
    parser.add_argument("--temperature", type=float, default=1.0, help="0 for greedy decoding")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling, in (0, 1]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decode step (pays off only for long generations: compiling takes tens of "
        "seconds on CPU; needs a C++ compiler there)",
    )


def main(args: argparse.Namespace) -> str:
    """Print the prompt, then stream its continuation to stdout; returns the continuation."""
    sampling = SamplingConfig(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed
    )
    model, tokenizer = load_for_sampling(args.ckpt)
    pieces = stream_text(model, tokenizer, args.prompt, args.max_new_tokens, sampling, args.compile)
    first = next(pieces, "")  # a bad prompt raises here, before anything is printed
    sys.stdout.write(args.prompt)
    out = []
    for piece in itertools.chain([first], pieces):
        sys.stdout.write(piece)
        sys.stdout.flush()
        out.append(piece)
    sys.stdout.write("\n")
    return "".join(out)
