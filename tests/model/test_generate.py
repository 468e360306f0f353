"""KV-cached generation: cached logits equal a full forward, for every residual variant."""

from __future__ import annotations

import pytest
import torch

from attnres.model import ModelConfig, Transformer
from attnres.model.cache import KVCache
from attnres.model.generate import SamplingConfig, generate, left_pad, prefill, sample_next, stream
from attnres.residuals import variant_names

VOCAB = 99
GREEDY = SamplingConfig(temperature=0)


def make_model(variant: str, d: int = 32, n_layers: int = 3, seq_len: int = 24, seed: int = 0) -> Transformer:
    """A small GQA model whose residual parameters are moved off their init.

    At init AttnRes queries are zero (uniform reads), which would hide a read that sees the wrong
    sources; random residual parameters make every variant's reads input-dependent.
    """
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=VOCAB,
        d_model=d,
        n_layers=n_layers,
        n_heads=4 if d % 8 == 0 else 2,  # even head size for RoPE
        n_kv_heads=2 if d % 8 == 0 else 1,
        seq_len=seq_len,
        residual={"variant": variant},
    )
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.residual.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return model


def poisoned_cache(model: Transformer, batch: int, capacity: int) -> KVCache:
    """A cache whose unwritten slots are NaN, so reading one shows up in the logits."""
    cache = KVCache(model.cfg, batch, capacity)
    cache.k.fill_(float("nan"))
    cache.v.fill_(float("nan"))
    return cache


@pytest.mark.parametrize("variant", variant_names())
@pytest.mark.parametrize("d, prompt_len", [(32, 1), (100, 7)])
def test_cached_decode_equals_full_forward(variant: str, d: int, prompt_len: int) -> None:
    model = make_model(variant, d=d)
    tokens = torch.randint(0, VOCAB, (2, prompt_len + 6))
    with torch.no_grad():
        expected = model(tokens)  # [B, T, V]
        cache = poisoned_cache(model, 2, tokens.shape[1] + 3)
        steps = [model(tokens[:, :prompt_len], cache=cache)]
        for t in range(prompt_len, tokens.shape[1]):
            steps.append(model(tokens[:, t : t + 1], cache=cache))
    got = torch.cat(steps, dim=1)
    assert cache.length == tokens.shape[1]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", variant_names())
@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_chunked_prefill_equals_one_shot(variant: str, chunk: int) -> None:
    model = make_model(variant)
    tokens = torch.randint(0, VOCAB, (3, 7))
    one_shot = prefill(model, tokens, KVCache(model.cfg, 3, 7), all_logits=True)
    chunked_cache = poisoned_cache(model, 3, 7)
    chunked = prefill(model, tokens, chunked_cache, chunk=chunk, all_logits=True)
    torch.testing.assert_close(chunked, one_shot, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        prefill(model, tokens, KVCache(model.cfg, 3, 7), chunk=chunk), one_shot[:, -1], atol=1e-5, rtol=0
    )
    # The cache a chunked prefill leaves behind is the one-shot cache: decoding continues alike.
    one_shot_cache = KVCache(model.cfg, 3, 7)
    prefill(model, tokens, one_shot_cache)
    torch.testing.assert_close(chunked_cache.k, one_shot_cache.k, atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked_cache.v, one_shot_cache.v, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", variant_names())
def test_left_padded_rows_match_unpadded_rows(variant: str) -> None:
    """Padding is invisible: each row's logits equal that prompt's logits alone."""
    model = make_model(variant)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [1, 2], [3, 4, 5, 6]]
    tokens, mask = left_pad(prompts)
    for chunk in (None, 3):
        logits = prefill(model, tokens, KVCache(model.cfg, 3, 7), mask, chunk=chunk, all_logits=True)
        for row, prompt in enumerate(prompts):
            alone = model(torch.tensor([prompt]))[0]
            torch.testing.assert_close(logits[row, 7 - len(prompt) :], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", variant_names())
@pytest.mark.parametrize("prefill_chunk", [None, 2])
def test_batched_greedy_equals_per_prompt_greedy(variant: str, prefill_chunk: int | None) -> None:
    model = make_model(variant)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [1], [3, 4, 5, 6]]
    batched = generate(model, prompts, 8, GREEDY, prefill_chunk=prefill_chunk)
    alone = [generate(model, [p], 8, GREEDY)[0] for p in prompts]
    assert batched == alone
    assert all(len(out) == 8 for out in batched)


def test_greedy_generation_follows_the_full_forward_argmax() -> None:
    model = make_model("block")
    out = generate(model, [[1, 2, 3]], 6, GREEDY)[0]
    seq = [1, 2, 3]
    for _ in range(6):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out == seq[3:]


def test_same_seed_same_sample_and_other_seed_differs() -> None:
    model = make_model("full")
    prompts = [[1, 2, 3], [4]]

    def run(seed: int) -> list[list[int]]:
        return generate(model, prompts, 16, SamplingConfig(temperature=1.5, top_k=50, top_p=0.95, seed=seed))

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_stop_token_ends_its_row_only() -> None:
    model = make_model("block")
    prompts = [[1, 2, 3], [9, 8]]
    free = generate(model, prompts, 6, GREEDY)
    stop = free[0][1]
    assert stop not in free[1], "pick prompts whose rows differ for this test to mean anything"
    out = generate(model, prompts, 6, GREEDY, stop_tokens=[stop])
    assert out[0] == free[0][: free[0].index(stop) + 1]
    assert out[1] == free[1]
    steps = list(stream(model, prompts, 6, GREEDY, stop_tokens=[stop]))
    assert len(steps) == 6 and int(steps[-1][0]) == -1


def test_generation_stops_when_every_row_has_stopped() -> None:
    model = make_model("prenorm")
    first = generate(model, [[1, 2]], 1, GREEDY)[0][0]
    assert len(list(stream(model, [[1, 2]], 10, GREEDY, stop_tokens=[first]))) == 1


def test_top_k_and_top_p_restrict_the_support() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0, -1.0]]).repeat(400, 1)
    top2 = sample_next(logits, SamplingConfig(top_k=2), gen)
    assert set(top2.tolist()) == {1, 2}
    # probs of [3, 2, 1, 0, -1]: 0.636, 0.234, 0.086, 0.032, 0.012; top_p=0.8 keeps the first two.
    nucleus = sample_next(logits, SamplingConfig(top_p=0.8), gen)
    assert set(nucleus.tolist()) == {1, 2}
    assert set(sample_next(logits, SamplingConfig(top_p=1e-6), gen).tolist()) == {1}
    assert set(sample_next(logits, SamplingConfig(top_k=1), gen).tolist()) == {1}
    assert set(sample_next(logits, SamplingConfig(), gen).tolist()) == {0, 1, 2, 3, 4}


def test_greedy_is_argmax() -> None:
    logits = torch.randn(5, VOCAB)
    assert torch.equal(sample_next(logits, GREEDY), logits.argmax(-1))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"top_p": 0.0}, "top_p must lie in"),
        ({"top_p": 1.5}, "top_p must lie in"),
        ({"top_p": -0.1}, "top_p must lie in"),
        ({"top_k": 0}, "top_k must be"),
        ({"temperature": -1.0}, "temperature must be"),
        ({"temperature": float("nan")}, "temperature must be"),
    ],
)
def test_bad_sampling_settings_are_rejected(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kwargs)


@pytest.mark.parametrize(
    "prompts, max_new, match",
    [
        ([[]], 4, "prompt 0 is empty"),
        ([[1], []], 4, "prompt 1 is empty"),
        ([], 4, "no prompts"),
        ([[1] * 25], 0, "more than the model's context"),
        ([[1] * 20], 5, "at most 4 new tokens fit"),
        ([[1, 99]], 2, r"prompt 0.s token ids must lie in \[0, 99\)"),
        ([[1]], -1, "max_new_tokens must be"),
    ],
)
def test_bad_prompts_are_rejected(prompts: list, max_new: int, match: str) -> None:
    model = make_model("prenorm")
    with pytest.raises(ValueError, match=match):
        generate(model, prompts, max_new, GREEDY)


def test_cache_misuse_is_rejected() -> None:
    model = make_model("block")
    cache = KVCache(model.cfg, 1, 4)
    model(torch.tensor([[1, 2, 3]]), cache=cache)
    with pytest.raises(ValueError, match="KV cache is full"):
        model(torch.tensor([[1, 2]]), cache=cache)
    with pytest.raises(ValueError, match="attention_mask must be"):
        model(torch.tensor([[1, 2], [3, 4]]), cache=KVCache(model.cfg, 2, 4), attention_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="attention_mask needs a KVCache"):
        model(torch.tensor([[1, 2]]), attention_mask=torch.ones(1, 2))
    with pytest.raises(ValueError, match="positions must lie in"):
        model(torch.tensor([[1]]), cache=KVCache(model.cfg, 1, 4), positions=torch.tensor([[24]]))


def test_cache_positions_count_real_tokens_per_row() -> None:
    """RoPE is shift-invariant, so logits cannot catch a padded row's offset; check the positions."""
    cfg = make_model("prenorm").cfg
    cache = KVCache(cfg, 2, 6)
    mask = torch.tensor([[False, False, True], [True, True, True]])
    assert cache.begin(3, mask).tolist() == [[0, 0, 0], [0, 1, 2]]
    assert cache.begin(1).tolist() == [[1], [3]]
    assert cache.valid[:, :4].tolist() == [[False, False, True, True], [True] * 4]
    assert cache.next_position.tolist() == [2, 4]


@pytest.mark.parametrize("variant", ["block", "full"])
@pytest.mark.parametrize("chunk", [None, 3])
def test_greedy_generation_equals_the_reference_reads(variant: str, chunk: int | None) -> None:
    """fp32: greedy tokens with the default inference reads (two-phase on the stack, native kernels,
    the reads fused with their norms) equal those of the reference read, token for token."""
    from attnres.ops.dispatch import use_impl

    model = make_model(variant, d=100, seq_len=40)
    prompts = [torch.randint(0, VOCAB, (n,)).tolist() for n in (5, 9)]
    out = {}
    for impl in ("reference", "auto"):
        with use_impl(impl):
            out[impl] = generate(model, prompts, max_new_tokens=24, sampling=GREEDY, prefill_chunk=chunk)
    assert out["auto"] == out["reference"]
