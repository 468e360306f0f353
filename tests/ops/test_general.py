"""The generalised reference read (AttnRes Table 4 ablations) against the paper's reference read."""

from __future__ import annotations

import pytest
import torch

from attnres.ops.general import general_depth_logits, general_depth_read
from attnres.ops.reference import depth_read, depth_weights


def _inputs(d, T, n=4, dtype=torch.float32, seed=0):
    # the reads compute in fp32 for fp32/bf16 inputs and in fp64 for fp64 ones
    g = torch.Generator().manual_seed(seed)
    sources = [torch.randn(2, T, d, generator=g, dtype=dtype).requires_grad_() for _ in range(n)]
    query = torch.randn(d, generator=g, dtype=dtype).requires_grad_()
    gain = (1 + 0.1 * torch.randn(d, generator=g, dtype=dtype)).requires_grad_()
    return sources, query, gain


def _grads(out, params):
    return torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), params)


def test_fp64_reads_keep_fp64() -> None:
    """In fp64 the ablation read is the reference read to rounding (it used to drop to fp32: 6.5e-7)."""
    sources, query, gain = _inputs(100, 3, n=7, dtype=torch.float64)
    out, _ = general_depth_read(sources, query, gain)
    torch.testing.assert_close(out, depth_read(sources, query, gain), rtol=1e-13, atol=1e-13)
    logits = torch.randn(7, dtype=torch.float64)
    mixed, weights = general_depth_read(sources, None, None, logits=logits)
    assert weights.dtype == torch.float64
    expected = sum(w * v for w, v in zip(logits.softmax(0), sources, strict=True))
    torch.testing.assert_close(mixed, expected, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("d", [32, 100])
@pytest.mark.parametrize("T", [1, 7])
def test_defaults_and_one_head_equal_the_reference_read(d, T):
    sources, query, gain = _inputs(d, T)
    ref = depth_read(sources, query, gain)
    out, weights = general_depth_read(sources, query, gain, heads=1)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(weights[..., 0], depth_weights(sources, query, gain), rtol=0, atol=0)
    for a, b in zip(_grads(out, [*sources, query, gain]), _grads(ref, [*sources, query, gain]), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("d", [32, 100])
def test_multi_head_is_a_softmax_per_channel_group(d):
    sources, query, gain = _inputs(d, 7)
    H = 4
    out, weights = general_depth_read(sources, query, gain, heads=H)
    assert weights.shape == (4, 2, 7, H)
    keys = torch.stack(sources).float()
    keys = keys * torch.rsqrt(keys.pow(2).mean(-1, keepdim=True) + 1e-6) * gain.float()
    c = d // H
    for h in range(H):
        sl = slice(h * c, (h + 1) * c)
        w = (keys[..., sl] * query.float()[sl]).sum(-1).softmax(0)  # [N, B, T]
        expected = (w.unsqueeze(-1) * torch.stack(sources).float()[..., sl]).sum(0)
        torch.testing.assert_close(out[..., sl], expected, rtol=1e-5, atol=1e-6)
    # heads really differ: not the single-head answer
    assert not torch.allclose(out, general_depth_read(sources, query, gain, heads=1)[0])


def test_sigmoid_and_softmax_share_scores_and_differ_only_in_normalisation():
    sources, query, gain = _inputs(32, 7)
    logits = general_depth_logits(sources, query, gain)
    out_soft, w_soft = general_depth_read(sources, query, gain, normalizer="softmax")
    out_sig, w_sig = general_depth_read(sources, query, gain, normalizer="sigmoid")
    torch.testing.assert_close(w_soft, logits.softmax(0))
    torch.testing.assert_close(w_sig, torch.sigmoid(logits))
    vals = torch.stack(sources)
    torch.testing.assert_close(out_sig, (w_sig * vals).sum(0), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out_sig, out_soft)
    # with a zero query: softmax is uniform (1/N, sums to 1); sigmoid gives 1/2 to every source
    zero = torch.zeros(32)
    torch.testing.assert_close(
        general_depth_read(sources, zero, gain, normalizer="sigmoid")[0], 0.5 * vals.sum(0)
    )
    torch.testing.assert_close(general_depth_read(sources, zero, gain)[0], vals.mean(0))


def test_no_key_norm_scores_the_raw_sources():
    sources, query, _ = _inputs(32, 7)
    logits = general_depth_logits(sources, query, None)
    torch.testing.assert_close(logits[..., 0], torch.stack(sources) @ query, rtol=1e-5, atol=1e-5)


def test_input_independent_mixing_uses_only_the_logits():
    sources, _, _ = _inputs(32, 7, n=3)
    logits = torch.tensor([0.5, -1.0, 2.0])
    out, _ = general_depth_read(sources, None, None, logits=logits)
    a = logits.softmax(0)
    torch.testing.assert_close(out, a[0] * sources[0] + a[1] * sources[1] + a[2] * sources[2])
    with pytest.raises(ValueError, match=r"shape \[3\]"):
        general_depth_read(sources, None, None, logits=logits[:2])


def test_input_dependent_query_is_per_token():
    sources, _, gain = _inputs(32, 7)
    q = torch.randn(2, 7, 32)
    out, w = general_depth_read(sources, q, gain)
    t = 3
    ref = depth_read([s[:, t] for s in sources], q[0, t], gain)[0]
    torch.testing.assert_close(out[0, t], ref)
