"""The inference two-phase path (stacked sources, no autograd) against the reference read.

The tests taking the ``backend`` fixture run twice: on the native kernels (outputs NaN-poisoned, so
an element a kernel forgets to write shows up) and on the PyTorch ops.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from attnres.model import ModelConfig, Transformer
from attnres.ops import stacked
from attnres.ops.dispatch import select_impl, use_impl
from attnres.ops.fused import fold_query, rstd_stat
from attnres.ops.reference import depth_read
from attnres.ops.stacked import SourceStack, stacked_merge, stacked_phase1
from attnres.residuals.attnres import DepthState, StackedDepthState
from tests.ops.test_fast_reads import TOL, ToyStack, assert_close, make_query_gain, make_sources


@pytest.fixture(autouse=True)
def poisoned_stacks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every stack starts full of NaN, so a read of a row that was never pushed shows up."""
    init = SourceStack.__init__

    def poisoned(self: SourceStack, like: torch.Tensor, capacity: int) -> None:
        init(self, like, capacity)
        self.values.fill_(float("nan"))
        self.rstd.fill_(float("nan"))

    monkeypatch.setattr(stacked.SourceStack, "__init__", poisoned)


def stacked_group(n_blocks: int, s: int, t: int, d: int, dtype: torch.dtype, spare: int = 0) -> tuple:
    """``n_blocks`` pushed onto a stack (``spare`` more rows, left NaN), a partial sum, ``s`` queries
    and gains and their folded form: ``(blocks, partial, queries, gains, stack, folded)``."""
    *blocks, partial = make_sources(n_blocks + 1, t, d, dtype)
    queries, gains = make_query_gain(d, s)
    stack = SourceStack(partial, n_blocks + spare)
    for b in blocks:
        stack.push(b, rstd_stat(b, 1e-6))
    return blocks, partial, queries, gains, stack, fold_query(queries, gains, dtype)


READS = [(1, 1, 7, 32), (1, 3, 1, 100), (3, 8, 7, 100), (8, 3, 1, 1168), (32, 2, 7, 32), (32, 1, 1, 1168)]


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("n_blocks", "s", "t", "d"), READS)
@torch.no_grad()
def test_phase1_plus_merge_matches_reference(
    dtype: torch.dtype, n_blocks: int, s: int, t: int, d: int
) -> None:
    """Every read of a group: phase 1 over the stacked blocks, then the merge with the partial sum."""
    blocks, partial, queries, gains, stack, folded = stacked_group(n_blocks, s, t, d, dtype, spare=3)
    outs, lse = stacked_phase1(stack, folded, need_lse=True)
    only_outs, no_lse = stacked_phase1(stack, folded, need_lse=False)
    assert no_lse is None
    assert_close("phase 1 without lse", only_outs, outs, TOL[dtype])
    for i in range(s):
        ref_blocks = depth_read(blocks, queries[i], gains[i])
        assert_close(f"read {i} phase 1", outs[:, i].view(partial.shape), ref_blocks, TOL[dtype])
        ref = depth_read([*blocks, partial], queries[i], gains[i])
        out = stacked_merge(outs[:, i], lse[:, i], partial, rstd_stat(partial, 1e-6), folded[i])
        assert out.dtype == dtype and out.shape == partial.shape
        assert_close(f"read {i} merged", out, ref, TOL[dtype])


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("n_blocks", "s", "t", "d"), READS)
@torch.no_grad()
def test_merge_fused_with_its_norm_matches_reference(
    dtype: torch.dtype, n_blocks: int, s: int, t: int, d: int
) -> None:
    """The merge with the RMSNorm after it, from strided inputs: ``o`` and ``lse`` are slices of the
    group's ``[M, S, d]`` / ``[M, S]``, and the partial sum is a transposed view."""
    blocks, partial, queries, gains, stack, folded = stacked_group(n_blocks, s, t, d, dtype)
    partial = partial.detach().transpose(0, 1).contiguous().transpose(0, 1)  # [T, 2, d] memory
    outs, lse = stacked_phase1(stack, folded, need_lse=True)
    weight = (1 + 0.3 * torch.randn(d, dtype=torch.float64)).to(dtype)
    for i in range(s):
        ref = depth_read([*blocks, partial], queries[i], gains[i]).double()
        ref = F.rms_norm(ref, (d,), weight.double(), 1e-5)
        out = stacked_merge(outs[:, i], lse[:, i], partial, rstd_stat(partial, 1e-6), folded[i], weight, 1e-5)
        assert out.dtype == dtype and out.shape == partial.shape
        assert_close(f"read {i} merged and normed", out, ref, TOL[dtype])


@pytest.mark.usefixtures("backend")
@torch.no_grad()
def test_single_block_read_is_identity() -> None:
    (v,) = make_sources(1, 7, 100, torch.float32)
    queries, gains = make_query_gain(100, 2)
    stack = SourceStack(v, 4)
    stack.push(v, rstd_stat(v, 1e-6))
    outs, _ = stacked_phase1(stack, fold_query(queries, gains, v.dtype), need_lse=False)
    assert torch.equal(outs[:, 0].view(v.shape), v) and torch.equal(outs[:, 1].view(v.shape), v)


@torch.no_grad()
def test_stack_refuses_overflow() -> None:
    v = torch.randn(2, 3, 8)
    stack = SourceStack(v, 1)
    stack.push(v, rstd_stat(v, 1e-6))
    with pytest.raises(RuntimeError, match="stack is full"):
        stack.push(v, rstd_stat(v, 1e-6))


SCHEDULES = [
    ("full", 7, None), ("block", 7, 1), ("block", 7, 2), ("block", 7, 3), ("block", 5, 8), ("block", 9, 3),
    ("block", 8, 4),
]  # fmt: skip


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize(("variant", "n_sublayers", "block_size"), SCHEDULES)
@torch.no_grad()
def test_scheme_inference_matches_reference(
    dtype: torch.dtype, variant: str, n_sublayers: int, block_size: int | None
) -> None:
    """Without gradients, two-phase runs on the stack and equals per-read reference reads, also
    for an embedding that is a strided view (a sequence-first layout, transposed)."""
    model = ToyStack(variant, 100, n_sublayers, block_size, dtype)
    for t, transposed in ((1, False), (7, False), (7, True)):
        x = torch.randn(2, t, 100, dtype=torch.float64).to(dtype)
        if transposed:
            x = x.transpose(0, 1).contiguous().transpose(0, 1)  # [2, T, d] values, [T, 2, d] memory
        with use_impl("reference"):
            ref = model(x)
        with use_impl("two_phase"):
            assert isinstance(model.scheme.init_state(x), StackedDepthState)
            out = model(x)
        assert_close(f"T={t}", out, ref, TOL[dtype] * (10 if dtype == torch.float64 else 3))


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("variant", "n_sublayers", "block_size"), SCHEDULES)
@torch.no_grad()
def test_normed_reads_equal_the_norm_of_reference_reads(
    dtype: torch.dtype, variant: str, n_sublayers: int, block_size: int | None
) -> None:
    """``fused_normed_input`` / ``normed_final`` (the read fused with the norm after it) at every site
    equal ``norm(read)`` with the reference read, through a whole schedule."""
    model = ToyStack(variant, 100, n_sublayers, block_size, dtype)
    norms = [torch.nn.RMSNorm(100, eps=1e-5, dtype=dtype) for _ in range(n_sublayers + 1)]
    for norm in norms:
        norm.weight.copy_(1 + 0.3 * torch.randn(100))
    scheme = model.scheme
    x = torch.randn(2, 7, 100, dtype=torch.float64).to(dtype)
    x = x.transpose(0, 1).contiguous().transpose(0, 1)
    tol = TOL[dtype] * (10 if dtype == torch.float64 else 3)
    with use_impl("two_phase"):
        fast = scheme.init_state(x)
    with use_impl("reference"):
        ref = scheme.init_state(x)
    for layer, w in enumerate(model.weights):
        got, want = (
            scheme.fused_normed_input(fast, layer, norms[layer]),
            norms[layer](scheme.layer_input(ref, layer)),
        )
        assert got is not None and got.dtype == dtype
        assert scheme.fused_normed_input(ref, layer, norms[layer]) is None  # nothing to fuse there
        assert_close(f"site {layer}", got, want, tol)
        out = torch.tanh(want @ w)  # the same sublayer output for both states
        fast, ref = scheme.update(fast, layer, out), scheme.update(ref, layer, out)
    assert_close("final", scheme.normed_final(fast, norms[-1]), norms[-1](scheme.final(ref)), tol)


def test_auto_picks_fused_for_training_and_two_phase_for_inference() -> None:
    scheme = ToyStack("block", 32, 4, 2, torch.float32).scheme
    x = torch.randn(2, 3, 32)
    assert select_impl("auto") == "fused"
    assert isinstance(scheme.init_state(x), DepthState)
    with torch.no_grad():
        assert select_impl("auto") == "two_phase"
        assert isinstance(scheme.init_state(x), StackedDepthState)
    with torch.inference_mode():
        assert isinstance(scheme.init_state(x), StackedDepthState)


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("variant", ["block", "full"])
@torch.no_grad()
def test_model_logits_agree_in_inference(variant: str) -> None:
    """Whole model, no gradients: logits of every implementation equal the reference (fp64)."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=99, d_model=32, n_layers=3, n_heads=4, seq_len=16,
        residual={"variant": variant, "block_size": 4 if variant == "block" else None},
    )  # fmt: skip
    model = Transformer(cfg).double()
    model.residual.query.normal_(0, 0.5)  # trained-looking queries; zero init hides query errors
    tokens = torch.randint(0, 99, (2, 8))
    with use_impl("reference"):
        ref = model(tokens)
    for impl in ("auto", "fused", "two_phase"):
        with use_impl(impl):
            assert_close(f"{impl} logits", model(tokens), ref, 1e-12)


def compile_toy(impl: str, grad: bool, backend: str) -> tuple[torch.Tensor, ToyStack]:
    """A toy residual stack compiled with ``fullgraph=True``; its output checked against the reference."""
    torch._dynamo.reset()
    model = ToyStack("block", 32, 5, 2, torch.float32)
    x = torch.randn(2, 7, 32)
    with torch.no_grad(), use_impl("reference"):
        ref = model(x)
    with torch.set_grad_enabled(grad), use_impl(impl):
        out = torch.compile(model, fullgraph=True, backend=backend)(x)
    assert_close("compiled output", out, ref, TOL[torch.float32])
    return out, model


@pytest.mark.parametrize("impl", ["fused", "two_phase"])
def test_inference_path_compiles_fullgraph(impl: str) -> None:
    """Without gradients the residual path (stacked two-phase, or fused) traces into one graph."""
    compile_toy(impl, grad=False, backend="aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("grad", [True, False], ids=["train", "inference"])
def test_residual_path_compiles_fullgraph_with_inductor(grad: bool) -> None:
    """The default backend (inductor, C++ codegen on CPU) compiles the two-phase path in one graph."""
    out, model = compile_toy("two_phase", grad, backend="inductor")
    if grad:
        out.sum().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@torch.no_grad()
def test_replaying_an_inference_state_past_a_block_boundary_is_refused() -> None:
    """The no-grad blocks live on one shared stack: a second update across a boundary would read a
    block pushed by the first; it is an error, not a silently wrong read."""
    model = ToyStack("block", 32, 4, 2, torch.float64)
    x = torch.randn(1, 3, 32, dtype=torch.float64)
    scheme = model.scheme
    with use_impl("two_phase"):
        state = scheme.init_state(x)
        state = scheme.update(state, 0, torch.tanh(scheme.layer_input(state, 0)))
        out = torch.tanh(scheme.layer_input(state, 1))
        scheme.update(state, 1, out)  # layer 1 closes block 1 (S=2)
        with pytest.raises(RuntimeError, match="already advanced past this block boundary"):
            scheme.update(state, 1, out)


_FORCED_TORCH = """
import torch
import attnres.ops.native as native
from attnres.model import ModelConfig, Transformer
from attnres.ops.dispatch import use_impl

def refuse(*args, **kwargs):
    raise AssertionError("a native kernel ran although ATTNRES_KERNELS=torch")

native._loaded = refuse  # every native custom op calls it first
for variant in ("block", "full"):
    model = Transformer(ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, seq_len=8,
                                    residual={"variant": variant}))
    tokens = torch.randint(0, 50, (2, 8))
    for impl in ("auto", "fused", "two_phase"):
        with use_impl(impl):
            model(tokens).sum().backward()
            with torch.no_grad():
                model(tokens)
print("ok")
"""


def test_attnres_kernels_torch_forces_pytorch_ops_on_every_path() -> None:
    """``ATTNRES_KERNELS=torch``: no native kernel runs, in training (fused, two-phase) or without
    gradients (the stacked reads); a fresh process, since the variable is read at import."""
    env = {**os.environ, "ATTNRES_KERNELS": "torch"}
    run = subprocess.run([sys.executable, "-c", _FORCED_TORCH], env=env, capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]
