"""Fused and two-phase depth reads against the reference oracle: outputs and every gradient."""

from __future__ import annotations

import warnings

import pytest
import torch
from numerics import rel_err

from attnres.model import ModelConfig, Transformer, lm_loss
from attnres.ops.dispatch import check_impl, select_impl, use_impl, use_kernels
from attnres.ops.fused import fused_depth_read, source_rstd
from attnres.ops.reference import depth_read
from attnres.ops.two_phase import phase1, phase2_merge
from attnres.residuals import ResidualConfig, build_residual

FAST = ("fused", "two_phase")
# dtype -> max relative RMS error of outputs and gradients; fp32 query grads sum d·T terms
TOL = {torch.float64: 1e-12, torch.float32: 3e-5, torch.bfloat16: 1e-2}


def assert_close(name: str, x: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    assert torch.isfinite(x).all(), f"{name}: non-finite values"
    err = rel_err(x, ref)
    assert err <= tol, f"{name}: relative RMS error {err:.2e} > {tol:.0e}"


def assert_grads_close(name: str, grads, ref_grads, tol: float) -> None:
    """Each leaf's gradient against the reference's; a leaf the reference leaves at zero gets none."""
    for j, (g, rg) in enumerate(zip(grads, ref_grads, strict=True)):
        if rg is None or rg.abs().max() == 0:
            assert g is None or g.abs().max() == 0, f"{name}: leaf {j} got a spurious gradient"
        else:
            assert_close(f"{name}: d leaf {j}", g, rg, tol)


def make_sources(n: int, t: int, d: int, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    """``n`` leaf sources ``[2, t, d]`` with different scales, so the RMS norm matters."""
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(2, t, d, generator=g, dtype=torch.float64) * (0.5 + i % 4)).to(dtype).requires_grad_()
        for i in range(n)
    ]


def make_query_gain(d: int, s: int | None = None, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-trivial queries and gains (zero queries would hide query and gain errors)."""
    g = torch.Generator().manual_seed(seed)
    shape = (d,) if s is None else (s, d)
    q = (torch.randn(*shape, generator=g, dtype=torch.float64) * 0.3).requires_grad_()
    gain = (1 + 0.2 * torch.randn(*shape, generator=g, dtype=torch.float64)).requires_grad_()
    return q, gain


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    ("n", "t", "d"),
    [
        (1, 7, 32),
        (2, 1, 100),
        (5, 7, 100),
        (33, 7, 32),
        (9, 1, 1168),
        (4, 14, 32),
        (3, 61, 100),
    ],
)  # fmt: skip  (2×14 and 2×61 tokens: the native backward splits them into chunks across threads)
def test_fused_read_matches_reference(dtype: torch.dtype, n: int, t: int, d: int) -> None:
    sources = make_sources(n, t, d, dtype)
    q, gain = make_query_gain(d)
    grad_out = torch.randn(2, t, d, dtype=torch.float64).to(dtype)
    results = []
    for read in (depth_read, fused_depth_read):
        out = read(sources, q, gain, 1e-6)
        assert out.dtype == dtype
        results.append((out, torch.autograd.grad(out, [*sources, q, gain], grad_out)))
    (ref, ref_grads), (out, grads) = results
    tol = TOL[dtype]
    assert_close("output", out, ref, tol)
    names = [f"d source {i}" for i in range(n)] + ["d query", "d gain"]
    for name, g, rg in zip(names, grads, ref_grads, strict=True):
        if n == 1 and name in ("d query", "d gain"):
            assert g.abs().max() < 1e-6, "a one-source read is the identity: no query gradient"
            continue
        assert_close(name, g, rg, tol)


@pytest.mark.usefixtures("backend")
def test_fused_single_source_is_identity() -> None:
    (v,) = make_sources(1, 7, 100, torch.float32)
    q, gain = make_query_gain(100)
    assert torch.equal(fused_depth_read([v], q, gain), v)


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("n_blocks", "s", "d"), [(1, 1, 32), (3, 8, 100), (8, 3, 1168), (32, 2, 32)])
def test_phase1_plus_merge_matches_reference(dtype: torch.dtype, n_blocks: int, s: int, d: int) -> None:
    """Every read of a group: phase 1 over the blocks, then the merge with the partial sum."""
    *blocks, partial = make_sources(n_blocks + 1, 7, d, dtype)
    queries, gains = make_query_gain(d, s)
    tol = TOL[dtype]
    rstd = [source_rstd(b, 1e-6) for b in blocks]
    outs, lse = phase1(blocks, rstd, queries, gains)
    r_p = source_rstd(partial, 1e-6)
    leaves = [*blocks, partial, queries, gains]
    for i in range(s):
        grad_out = torch.randn(2, 7, d, dtype=torch.float64).to(dtype)
        ref = depth_read([*blocks, partial], queries[i], gains[i])
        ref_grads = torch.autograd.grad(ref, leaves, grad_out, allow_unused=True)
        out = phase2_merge(outs[i], lse[..., i], partial, r_p, queries[i], gains[i])
        grads = torch.autograd.grad(out, leaves, grad_out, retain_graph=True, allow_unused=True)
        assert_close(f"read {i} output", out, ref, tol)
        assert_grads_close(f"read {i}", grads, ref_grads, tol)


def test_merge_rejects_mismatched_shapes() -> None:
    blocks = make_sources(2, 7, 32, torch.float32)
    queries, gains = make_query_gain(32, 1)
    outs, lse = phase1(blocks, [source_rstd(b, 1e-6) for b in blocks], queries, gains)
    with pytest.raises(ValueError, match="phase-2 shapes disagree"):
        phase2_merge(outs[0], lse[..., 0], torch.zeros(2, 6, 32), torch.ones(2, 6), queries[0], gains[0])


class ToyStack(torch.nn.Module):
    """``L`` sublayers ``f_l(h) = tanh(h W_l)`` driven by a residual scheme, like ``Transformer.hidden``."""

    def __init__(self, variant: str, d: int, n_sublayers: int, block_size: int | None, dtype: torch.dtype):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.scheme = build_residual(
            ResidualConfig.for_variant(variant, block_size=block_size), d, n_sublayers
        )
        with torch.no_grad():  # non-zero queries, so the test sees the query and gain paths
            self.scheme.query.copy_(torch.randn(n_sublayers + 1, d, generator=g))
            self.scheme.key_gain.add_(0.2 * torch.randn(n_sublayers + 1, d, generator=g))
        self.weights = torch.nn.Parameter(torch.randn(n_sublayers, d, d, generator=g) / d**0.5)
        self.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.scheme.init_state(x)
        for layer, w in enumerate(self.weights):
            out = torch.tanh(self.scheme.layer_input(state, layer) @ w)
            state = self.scheme.update(state, layer, out)
        return self.scheme.final(state)


def run_toy(impl: str, model: ToyStack, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = x.detach().requires_grad_()
    with use_impl(impl):
        out = model(x)
    grad_out = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out).to(out.dtype)
    grads = torch.autograd.grad(out, [x, *model.parameters()], grad_out)
    return out, list(grads)


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize(("variant", "n_sublayers", "block_size"), [
    ("full", 7, None), ("block", 7, 1), ("block", 7, 2), ("block", 7, 3), ("block", 5, 8), ("block", 9, 3),
    ("swa", 12, None),
])  # fmt: skip
def test_scheme_impls_agree(dtype: torch.dtype, variant: str, n_sublayers: int, block_size: int) -> None:
    """Two-phase and fused equal per-read reference reads through a whole schedule (L % S != 0)."""
    model = ToyStack(variant, 100, n_sublayers, block_size, dtype)
    x = torch.randn(2, 7, 100, dtype=torch.float64).to(dtype)
    ref, ref_grads = run_toy("reference", model, x)
    tol = TOL[dtype] * (10 if dtype == torch.float64 else 3)  # errors compound over L sublayers
    for impl in FAST:
        out, grads = run_toy(impl, model, x)
        assert_close(f"{impl} output", out, ref, tol)
        for name, g, rg in zip(
            ["d input", "d query", "d key_gain", "d weights"], grads, ref_grads, strict=True
        ):
            assert_close(f"{impl} {name}", g, rg, tol)


@pytest.mark.usefixtures("backend")
def test_scheme_impls_agree_bf16() -> None:
    model = ToyStack("block", 100, 7, 3, torch.bfloat16)
    x = torch.randn(2, 7, 100).to(torch.bfloat16)
    ref, ref_grads = run_toy("reference", model, x)
    for impl in FAST:
        out, grads = run_toy(impl, model, x)
        assert_close(f"{impl} output", out, ref, 2e-2)
        for g, rg in zip(grads, ref_grads, strict=True):
            assert_close(f"{impl} grad", g, rg, 3e-2)


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("variant", ["block", "full"])
def test_model_logits_and_grads_agree(variant: str) -> None:
    """Whole model: logits and every parameter gradient equal across implementations (fp64)."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=99, d_model=32, n_layers=3, n_heads=4, seq_len=16,
        residual=ResidualConfig.for_variant(variant, block_size=4 if variant == "block" else None),
    )  # fmt: skip
    model = Transformer(cfg).double()
    with torch.no_grad():  # trained-looking queries; zero init would hide query-path errors
        model.residual.query.normal_(0, 0.5)
    tokens = torch.randint(0, 99, (2, 8))
    results = {}
    for impl in ("reference", *FAST):
        model.zero_grad(set_to_none=True)
        with use_impl(impl):
            logits = model(tokens)
        lm_loss(logits, tokens).backward()
        results[impl] = (logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    ref_logits, ref_grads = results["reference"]
    for impl in FAST:
        logits, grads = results[impl]
        assert_close(f"{impl} logits", logits, ref_logits, 1e-12)
        for name, g in grads.items():
            assert_close(f"{impl} grad {name}", g, ref_grads[name], 1e-10)


def test_dispatch_choices_and_errors() -> None:
    assert select_impl("auto") in FAST
    assert select_impl("fused") == "fused"
    with use_impl("reference"):
        assert select_impl("fused") == "reference"
    assert select_impl("auto", supported=False) == "reference"
    with pytest.warns(UserWarning, match="does not support"):
        assert select_impl("two_phase", supported=False) == "reference"
    with pytest.raises(ValueError, match="valid: auto, reference"):
        check_impl("triton")
    with pytest.raises(ValueError, match="unknown depth-read implementation"):
        ResidualConfig("block", impl="fast")


def test_default_model_uses_a_fast_path() -> None:
    scheme = build_residual(ResidualConfig("block"), 32, 6)
    state = scheme.init_state(torch.randn(2, 7, 32))
    assert state.impl in FAST
    assert len(state.rstd) == 1


def test_update_does_not_mutate_state() -> None:
    """Recomputation must be able to replay a sublayer: ``update`` leaves its input state alone."""
    scheme = build_residual(ResidualConfig("block", block_size=2, impl="two_phase"), 32, 6)
    state = scheme.init_state(torch.randn(2, 7, 32))
    before = (state.blocks, state.partial, state.rstd, state.group_start, state.group)
    out = torch.randn(2, 7, 32)
    first = scheme.update(state, 0, out)
    again = scheme.update(state, 0, out)
    assert (state.blocks, state.partial, state.rstd, state.group_start, state.group) == before
    assert torch.equal(scheme.layer_input(first, 1), scheme.layer_input(again, 1))


def test_residual_path_compiles_fullgraph() -> None:
    """The two-phase residual path traces into one graph (forward and backward) under torch.compile."""
    torch._dynamo.reset()
    model = ToyStack("block", 32, 5, 2, torch.float32)
    x = torch.randn(2, 7, 32)
    ref, ref_grads = run_toy("reference", model, x)
    with use_impl("two_phase"):
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        out = compiled(x)
    grads = torch.autograd.grad(
        out, list(model.parameters()), torch.linspace(-1, 1, out.numel()).view_as(out)
    )
    assert_close("compiled output", out, ref, 1e-5)
    for g, rg in zip(grads, ref_grads[1:], strict=True):
        assert_close("compiled grad", g, rg, 1e-5)


def test_native_build_failure_falls_back_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    """No compiler: reads still work on PyTorch ops, and the user is told once why they are slower."""
    from attnres.ops import native

    def no_compiler() -> None:
        raise RuntimeError("Error building extension: c++: command not found")

    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setattr(native, "_failed", False)
    monkeypatch.setattr(native, "_build", no_compiler)
    sources = make_sources(3, 7, 32, torch.float32)
    q, gain = make_query_gain(32)
    with pytest.warns(
        UserWarning, match="could not build the native CPU depth-read kernel.*command not found"
    ):
        out = fused_depth_read(sources, q, gain)
    assert_close("fallback output", out, depth_read(sources, q, gain), TOL[torch.float32])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused_depth_read(sources, q, gain)  # no second warning


def _native_grads(threads: int, tokens: int) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    sources = make_sources(4, tokens, 64, torch.float32)
    q, gain = make_query_gain(64)
    grad_out = torch.randn(2, tokens, 64)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with use_kernels("native"):
            return torch.autograd.grad(fused_depth_read(sources, q, gain), [*sources, q, gain], grad_out)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("tokens", [14, 101])  # 2×101 tokens: chunks of 64, the last one short
def test_native_kernels_any_thread_count(tokens: int) -> None:
    """The native backward sums per-chunk query gradients over fixed chunks: the reference's
    gradients, and bitwise the same ones with 1, 2 or 3 threads."""
    torch.manual_seed(0)
    sources = make_sources(4, tokens, 64, torch.float32)
    q, gain = make_query_gain(64)
    ref = torch.autograd.grad(depth_read(sources, q, gain), [*sources, q, gain], torch.randn(2, tokens, 64))
    one = _native_grads(1, tokens)
    for i, (g, rg) in enumerate(zip(one, ref, strict=True)):
        assert_close(f"grad {i}", g, rg, TOL[torch.float32])
    for threads in (2, 3):
        assert all(torch.equal(a, b) for a, b in zip(_native_grads(threads, tokens), one, strict=True))
