"""The reference depth read: the properties SPEC §2 pins down."""

from __future__ import annotations

import pytest
import torch

from attnres.ops.reference import depth_read, depth_weights


def _sources(n: int, shape=(2, 5, 32), dtype=torch.float32) -> list[torch.Tensor]:
    return [torch.randn(shape, dtype=dtype) * (i + 1) for i in range(n)]


@pytest.mark.parametrize("n", [1, 2, 5, 9])
def test_zero_query_is_uniform_average(n: int) -> None:
    src = _sources(n)
    d = src[0].shape[-1]
    out = depth_read(src, torch.zeros(d), torch.rand(d) + 0.5)
    torch.testing.assert_close(out, torch.stack(src).mean(0), atol=1e-6, rtol=1e-5)


def test_output_is_convex_combination() -> None:
    src = _sources(6, shape=(3, 11, 100))
    q, g = torch.randn(100) * 3, torch.rand(100) + 0.5
    out = depth_read(src, q, g)
    w = depth_weights(src, q, g)
    assert torch.all(w >= 0)
    torch.testing.assert_close(w.sum(0), torch.ones_like(w[0]))
    max_norm = torch.stack(src).norm(dim=-1).amax(0)  # per token
    assert torch.all(out.norm(dim=-1) <= max_norm * (1 + 1e-5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_single_source_is_identity(dtype: torch.dtype) -> None:
    (v,) = _sources(1, dtype=dtype)
    out = depth_read([v], torch.randn(32), torch.randn(32))
    assert out.dtype == dtype
    assert torch.equal(out, v)


def test_scaling_a_source_keeps_the_weights() -> None:
    src = _sources(4)
    q, g = torch.randn(32), torch.rand(32) + 0.5
    scaled = [s * (7.5 if i == 2 else 1.0) for i, s in enumerate(src)]
    torch.testing.assert_close(depth_weights(scaled, q, g, eps=0.0), depth_weights(src, q, g, eps=0.0))


def test_weights_follow_query() -> None:
    """A query aligned with one source's direction gives that source the largest weight."""
    src = [torch.zeros(1, 1, 8) for _ in range(3)]
    for i, s in enumerate(src):
        s[..., i] = 1.0
    q = torch.zeros(8)
    q[1] = 10.0
    w = depth_weights(src, q, torch.ones(8))
    assert w.argmax(0).item() == 1 and w[1].item() > 0.99


def test_statistics_in_fp32_and_result_in_stream_dtype() -> None:
    src = _sources(3, dtype=torch.bfloat16)
    q, g = torch.randn(32), torch.ones(32)
    out = depth_read(src, q, g)
    assert out.dtype == torch.bfloat16
    exact = depth_read([s.double() for s in src], q.double(), g.double())
    assert (out.double() - exact).abs().max() <= exact.abs().max() * 2**-7  # one bf16 rounding


def test_gradcheck_fp64() -> None:
    src = [s.requires_grad_() for s in _sources(3, shape=(2, 3, 6), dtype=torch.float64)]
    q = torch.randn(6, dtype=torch.float64, requires_grad=True)
    g = (torch.rand(6, dtype=torch.float64) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda q, g, *s: depth_read(list(s), q, g), (q, g, *src))


def test_no_sources_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one source"):
        depth_read([], torch.zeros(4), torch.ones(4))
