"""Autoregressive generation with a KV cache: chunked prefill, then one token per step.

The residual scheme is called through its ordinary interface at every step; without gradients,
AttnRes dispatches to its inference two-phase read (:mod:`attnres.ops.stacked`). A decode step is
simply a forward over one token per row. See :mod:`attnres.model.cache` for why no
depth state is cached across tokens.

Sampling, per row and step: ``temperature == 0`` is greedy (argmax). Otherwise logits are divided
by the temperature, restricted to the ``top_k`` most likely tokens, then to the smallest set whose
probability reaches ``top_p`` (nucleus), and one token is drawn with a ``torch.Generator`` seeded by
``seed``, so the same seed gives the same sample.

``compile=True`` compiles the decode step only (:func:`decode_step`, inductor, ``dynamic=True``):
the prompt's prefill runs once per call, and compiling it would cost more than it saves. The
step's graph is compiled once for a batch of one row and once for more rows (dynamo specialises
sizes 0 and 1), and serves every later prompt length, ``max_new_tokens`` and cache position: the
cache position is a symbolic size, and the cache keeps one spare slot (:func:`stream`) so that the
last step's slice of it is never the whole buffer, which dynamo would specialise on (a recompile
at the last step of every call). Each compilation takes tens of seconds on CPU, so compiled
generation pays off only over thousands of generated tokens (``benchmarks/results/compile_cpu.md``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attnres.configs import check_finite, check_int
from attnres.model.cache import KVCache
from attnres.model.compile import check_compile_supported
from attnres.model.transformer import Transformer, check_token_ids


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen; validated on construction.

    Attributes:
        temperature: ``0`` for greedy decoding, else ``> 0``.
        top_k: keep only the ``k`` most likely tokens (``None``: all).
        top_p: nucleus sampling, in ``(0, 1]`` (``1``: off).
        seed: seed of the sampling generator, in ``[0, 2**64)``.
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_finite("temperature", self.temperature)
        check_finite("top_p", self.top_p)
        if self.top_k is not None:
            check_int("top_k", self.top_k)
        check_int("seed", self.seed)
        if not 0 <= self.seed < 2**64:  # torch.Generator seeds are unsigned 64-bit
            raise ValueError(f"seed must lie in [0, 2**64), got {self.seed}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None (no limit), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1] (1 disables nucleus sampling), got {self.top_p}")


def sample_next(logits: Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> Tensor:
    """Choose one token per row from ``logits [B, vocab]``; returns ``[B]`` token ids.

    Raises:
        ValueError: a logit is NaN or inf (greedy decoding would silently pick token 0).
    """
    if not bool(torch.isfinite(logits).all()):
        raise ValueError(
            "the model's logits hold NaN or inf, so no token can be chosen; its weights are probably "
            "not finite (a run that diverged): use an earlier checkpoint or retrain"
        )
    if cfg.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < logits.shape[-1]:
        kth = logits.topk(cfg.top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already reach top_p; the top one always stays.
        drop = probs.cumsum(-1) - probs >= cfg.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Left-pad prompts into ``tokens [B, T]`` and ``attention_mask [B, T]`` (false = padding)."""
    width = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            tokens[row, width - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
            mask[row, width - len(prompt) :] = True
    return tokens, mask


@torch.no_grad()
def prefill(
    model: Transformer,
    tokens: Tensor,
    cache: KVCache,
    attention_mask: Tensor | None = None,
    chunk: int | None = None,
    all_logits: bool = False,
) -> Tensor:
    """Run the prompt through the model ``chunk`` tokens at a time, filling ``cache``.

    Peak memory for depth sources is about ``N·B·chunk·d`` rather than ``N·B·T·d`` (SPEC §5), and
    the result equals a one-shot prefill up to floating-point reassociation.

    Args:
        tokens: ``[B, T]`` prompt ids (left-padded for mixed lengths).
        cache: an empty or partly filled cache with room for ``T`` more slots.
        attention_mask: ``[B, T]``, false for padding.
        chunk: tokens per forward (``None``: all at once).
        all_logits: return logits for every position ``[B, T, vocab]`` instead of the last ``[B, vocab]``.
    """
    T = tokens.shape[1]
    chunk = T if chunk is None else chunk
    if chunk < 1:
        raise ValueError(f"prefill chunk must be >= 1 token, got {chunk}")
    pieces = []
    for start in range(0, T, chunk):
        part = slice(start, start + chunk)
        mask = None if attention_mask is None else attention_mask[:, part]
        h = model.hidden(tokens[:, part], cache=cache, attention_mask=mask)  # [B, chunk, d]
        if not all_logits:
            h = h[:, -1:]  # only the last position feeds the next token: skip the LM head elsewhere
        pieces.append(model.lm_head(model.norm(h)))
    return torch.cat(pieces, dim=1) if all_logits else pieces[-1][:, -1]


def _prompt_ids(i: int, prompt: Any) -> Tensor:
    """Prompt ``i`` as a 1-D tensor, or a TypeError saying what it is instead."""
    if isinstance(prompt, (str, bytes)):
        raise TypeError(
            f"prompt {i} is text ({prompt!r}); generation takes token ids: encode it with the tokenizer first"
        )
    if isinstance(prompt, Tensor):
        ids = prompt
    else:
        try:
            ids = torch.tensor(list(prompt))
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(
                f"prompt {i} must be a sequence of integer token ids, got {prompt!r} (prompts is a list of "
                "token-id lists: for one prompt pass [ids])"
            ) from None
    if ids.dim() != 1:
        raise ValueError(f"prompt {i} must be a flat sequence of token ids, got shape {tuple(ids.shape)}")
    if ids.dtype in (torch.uint8, torch.int8, torch.int16):  # small ints (numpy arrays, say) are ids too
        ids = ids.long()
    return ids


def _check_prompts(
    model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int
) -> list[list[int]]:
    """Validate the prompts and ``max_new_tokens``; return the prompts as lists of ids."""
    if isinstance(prompts, (str, bytes)):
        raise TypeError(
            f"prompts must be a list of token-id lists, got text {prompts!r}; encode it with the "
            "tokenizer and pass [ids]"
        )
    if len(prompts) == 0:
        raise ValueError("no prompts given: pass a list of token-id lists")
    check_int("max_new_tokens", max_new_tokens, minimum=0)
    seq_len, vocab = model.cfg.seq_len, model.cfg.vocab_size
    out = []
    for i, p in enumerate(prompts):
        ids = _prompt_ids(i, p)
        if len(ids) == 0:
            raise ValueError(f"prompt {i} is empty; generation needs at least one token to condition on")
        if len(ids) > seq_len:
            raise ValueError(
                f"prompt {i} has {len(ids)} tokens, more than the model's context model.seq_len={seq_len}; "
                "shorten the prompt"
            )
        if len(ids) + max_new_tokens > seq_len:
            raise ValueError(
                f"prompt {i} ({len(ids)} tokens) + max_new_tokens={max_new_tokens} exceeds model.seq_len="
                f"{seq_len}; at most {seq_len - len(ids)} new tokens fit"
            )
        check_token_ids(ids, vocab, what=f"prompt {i}'s token ids")
        out.append(ids.tolist())
    return out


def decode_step(model: Transformer, tokens: Tensor, cache: KVCache) -> Tensor:
    """One decode forward: the next-token logits ``[B, vocab]`` of ``tokens [B, 1]`` after ``cache``."""
    return model(tokens, cache=cache)[:, -1]


#: :func:`decode_step` under ``torch.compile``; its graphs are shared by every model of one class
compiled_decode_step = torch.compile(decode_step, dynamic=True, fullgraph=True)


@torch.no_grad()
def stream(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: SamplingConfig | None = None,
    stop_tokens: Sequence[int] = (),
    prefill_chunk: int | None = None,
    compile: bool = False,
) -> Iterator[Tensor]:
    """Generate token by token, yielding each step's new tokens ``[B]`` as they are chosen.

    A row that has emitted a stop token is finished: later steps yield ``-1`` for it. The stop
    token itself is yielded. Iteration ends after ``max_new_tokens`` steps or when every row is
    finished.

    Args:
        model: the LM (put it in eval mode; its parameters' dtype and device are used).
        prompts: ``B`` token-id lists, possibly of different lengths (they are left-padded).
        max_new_tokens: most tokens to generate per row.
        sampling: greedy, temperature, top-k, top-p and seed (default: ``SamplingConfig()``).
        stop_tokens: ids that end a row (e.g. the tokenizer's end-of-text id).
        prefill_chunk: prompt tokens per prefill forward (``None``: the whole prompt at once).
        compile: run the decode steps compiled (see the module docstring; the same tokens as eager
            up to floating-point reassociation, so greedy decoding may rarely pick another token at
            a near tie).
    """
    sampling = SamplingConfig() if sampling is None else sampling
    prompts = _check_prompts(model, prompts, max_new_tokens)
    if max_new_tokens == 0:
        return
    param = next(model.parameters())
    if compile:
        check_compile_supported(param.device)
    step_fn = compiled_decode_step if compile else decode_step
    tokens, mask = left_pad(prompts)
    tokens, mask = tokens.to(param.device), mask.to(param.device)
    capacity = tokens.shape[1] + max_new_tokens + (1 if compile else 0)  # compiled: one spare slot
    cache = KVCache(model.cfg, len(prompts), capacity, dtype=param.dtype, device=param.device)
    generator = torch.Generator(device=param.device).manual_seed(sampling.seed)
    stop = torch.as_tensor(list(stop_tokens), dtype=torch.long, device=param.device)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=param.device)
    logits = prefill(model, tokens, cache, mask, chunk=prefill_chunk)
    for step in range(max_new_tokens):
        nxt = sample_next(logits, sampling, generator)
        nxt = nxt.masked_fill(finished, -1)
        yield nxt
        finished |= torch.isin(nxt, stop)
        if bool(finished.all()) or step == max_new_tokens - 1:
            return
        # Finished rows keep decoding a harmless token; their output is discarded.
        logits = step_fn(model, nxt.clamp(min=0)[:, None], cache)


def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: SamplingConfig | None = None,
    stop_tokens: Sequence[int] = (),
    prefill_chunk: int | None = None,
    compile: bool = False,
) -> list[list[int]]:
    """The new tokens of each prompt (ending with its stop token, if one was emitted).

    Arguments are those of :func:`stream`; this collects its steps.
    """
    out: list[list[int]] = [[] for _ in prompts]
    for step_tokens in stream(model, prompts, max_new_tokens, sampling, stop_tokens, prefill_chunk, compile):
        for row, tok in enumerate(step_tokens.tolist()):
            if tok >= 0:
                out[row].append(tok)
    return out
