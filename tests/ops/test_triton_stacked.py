"""The Triton no-grad stacked reads (``attnres::triton_stack_phase1``, ``attnres::triton_stack_merge``).

Against the PyTorch twin in :mod:`attnres.ops.stacked` (kernels forced to ``torch``) and the oracle
:func:`attnres.ops.reference.depth_read`. Without CUDA they run under Triton's interpreter
(``tests/conftest.py`` turns it on before anything imports Triton); every buffer the kernels write is
NaN-filled first and checked after each test (the fixture of ``test_triton.py``, which also compiles
these kernels for sm_90).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import test_stacked  # noqa: E402
import test_triton  # noqa: E402
from test_fast_reads import ToyStack, assert_close, make_query_gain, make_sources  # noqa: E402

from attnres.model import ModelConfig, Transformer  # noqa: E402
from attnres.ops.dispatch import use_impl, use_kernels  # noqa: E402
from attnres.ops.fused import fold_query, rstd_stat  # noqa: E402
from attnres.ops.reference import depth_read  # noqa: E402
from attnres.ops.stacked import SourceStack, stacked_merge, stacked_phase1  # noqa: E402
from attnres.ops.triton import stacked as triton_stacked  # noqa: E402

DEVICE = test_triton.DEVICE
# autouse fixtures of the neighbouring tests, autouse here too: every kernel buffer NaN-filled (and
# checked after the test), every stack NaN-filled, so a read of a row never pushed shows up
nan_buffers = test_triton.nan_buffers
poisoned_stacks = test_stacked.poisoned_stacks

DTYPES = [torch.float64, torch.float32, torch.bfloat16]
# dtype -> max relative RMS error of an output (no gradients here). The interpreter rounds
# fp32 -> bf16 stores toward zero, the GPU to nearest; the bf16 bound covers both.
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
EPS = 1e-6


def on_device(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().to(DEVICE) for t in tensors]


def strided_like(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a slice of a wider buffer: a row stride past ``d``, and ``[M, d]`` rows still views."""
    wide = torch.full((*x.shape[:-1], x.shape[-1] + 5), float("nan"), dtype=x.dtype, device=x.device)
    wide[..., : x.shape[-1]] = x
    view = wide[..., : x.shape[-1]]
    assert not view.is_contiguous()
    return view


def make_stack(blocks: list[torch.Tensor], like: torch.Tensor, spare: int = 2) -> SourceStack:
    stack = SourceStack(like, len(blocks) + spare)  # the spare rows stay NaN
    for b in blocks:
        stack.push(b, rstd_stat(b, EPS))
    return stack


def run_read(kernels_: str, stack, folded, partial, norm_weight):
    """Phase 1 (with and without lse) and every merge of a group on ``kernels_``."""
    with torch.no_grad(), use_kernels(kernels_):
        outs, lse = stacked_phase1(stack, folded, need_lse=True)
        only_outs, no_lse = stacked_phase1(stack, folded, need_lse=False)
        assert no_lse is None
        r_p = rstd_stat(partial, EPS)
        merged = [
            stacked_merge(outs[:, i], lse[:, i], partial, r_p, folded[i], norm_weight, EPS)
            for i in range(folded.shape[0])
        ]
    return outs, only_outs, lse, merged


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm", [False, True], ids=["plain", "normed"])
@pytest.mark.parametrize(("n_blocks", "s", "t", "d"), [
    (1, 1, 7, 32), (1, 3, 1, 100), (3, 8, 7, 100), (8, 3, 1, 1168), (32, 2, 7, 32), (4, 11, 1, 32),
])  # fmt: skip
def test_phase1_plus_merge(
    dtype: torch.dtype, norm: bool, n_blocks: int, s: int, t: int, d: int, nan_buffers
) -> None:
    """Every read of a group against the torch twin and the oracle: phase 1 over the stacked blocks
    (``o`` and ``lse`` then read as strided slices of ``[M, S, d]`` and ``[M, S]``), then the merge with a
    strided partial sum, plain or fused with its RMSNorm.

    32 blocks + the partial are 33 sources; ``s = 11`` spans two query tiles of eight.
    """
    *blocks, partial = on_device(*make_sources(n_blocks + 1, t, d, dtype))
    partial = strided_like(partial)
    queries, gains = make_query_gain(d, s)
    weight = (1 + 0.3 * torch.randn(d, dtype=torch.float64)).to(DEVICE, dtype) if norm else None
    folded = fold_query(queries, gains, dtype).detach().to(DEVICE)
    stack = make_stack(blocks, partial)
    got = run_read("triton", stack, folded, partial, weight)
    twin = run_read("torch", stack, folded, partial, weight)
    assert len(nan_buffers) == 3 * 2 + s, "the kernels' buffers are not all reaching the NaN fixture"
    tol = TOL[dtype]
    outs, only_outs, lse, merged = got
    assert outs.shape == (2 * t, s, d) and outs.dtype == stack.values.dtype and lse.shape == (2 * t, s)
    assert_close("phase 1 vs torch", outs, twin[0], tol)
    assert_close("phase 1 without lse", only_outs, outs, tol)
    assert_close("lse vs torch", lse, twin[2], tol)
    for i in range(s):
        q, g = queries[i].to(DEVICE), gains[i].to(DEVICE)
        phase1_read = outs[:, i].view(partial.shape)
        assert_close(f"read {i} phase 1 vs reference", phase1_read, depth_read(blocks, q, g), tol)
        out = merged[i]
        assert out.dtype == dtype and out.shape == partial.shape
        assert_close(f"read {i} merged vs torch", out, twin[3][i], tol)
        ref = depth_read([*blocks, partial.contiguous()], q, g)
        if norm:  # the oracle's read, normalised in float64
            ref = F.rms_norm(ref.double(), (d,), weight.double(), EPS)
        assert_close(f"read {i} merged vs reference", out, ref, tol)


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float16], ids=str)
@pytest.mark.parametrize("tiled", [False, True], ids=["one_tile", "tiled"])
@pytest.mark.parametrize("norm", [False, True], ids=["plain", "normed"])
@pytest.mark.parametrize(("t", "d"), [(7, 32), (1, 100), (7, 1168)])
def test_merge(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, tiled: bool, norm: bool, t: int, d: int, nan_buffers
) -> None:
    """The merge kernel alone, both ways of covering a row (``tiled``: rows swept in tiles of 64, as
    for ``d`` past :data:`ONE_TILE_MAX`), with strided ``o``, ``lse``, ``r_p`` and partial."""
    if tiled:
        monkeypatch.setattr(triton_stacked, "ONE_TILE_MAX", 64)
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    gen = torch.Generator().manual_seed(3)
    m, s = 2 * t, 3

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(DEVICE)

    o = randn(m, s, d).to(cd)[:, 1]  # row stride s·d
    lse = randn(m, s).to(cd)[:, 2]  # stride s
    r_p = (randn(m, 2).abs() + 0.5).to(cd)[:, 0]  # stride 2
    q = randn(d, scale=0.3).to(cd)
    partial = strided_like(randn(2, t, d, scale=2.0).to(dtype))
    weight = (1 + 0.3 * randn(d)).to(dtype) if norm else None
    results = {}
    for kernels_ in ("torch", "triton"):
        with torch.no_grad(), use_kernels(kernels_):
            results[kernels_] = stacked_merge(o, lse, partial, r_p, q, weight, EPS)
    out = results["triton"]
    assert len(nan_buffers) == 1 and out.data_ptr() == nan_buffers[0].data_ptr()
    assert out.dtype == dtype and out.shape == partial.shape
    # the oracle in float64: h from the same inputs, then the norm
    p = partial.reshape(m, d).double()
    sig = torch.sigmoid((p @ q.double()) * r_p.double() - lse.double())[:, None]
    ref = o.double() + sig * (p - o.double())
    if norm:
        ref = F.rms_norm(ref, (d,), weight.double(), EPS)
    assert_close("merge vs float64", out.view(m, d), ref, TOL[dtype])
    assert_close("merge vs torch", out, results["torch"], TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize(("variant", "n_sublayers", "block_size"), [
    ("full", 7, None), ("block", 7, 2), ("block", 9, 3), ("block", 5, 8),
])  # fmt: skip
@torch.no_grad()
def test_scheme_inference_on_kernels(
    dtype: torch.dtype, variant: str, n_sublayers: int, block_size: int | None
) -> None:
    """A whole no-grad schedule on the stack (the group's merges with strided ``o``/``lse``), also for
    an embedding that is a strided view (a sequence-first layout transposed), equals reference reads."""
    model = ToyStack(variant, 100, n_sublayers, block_size, dtype).to(DEVICE)
    for t, transposed in ((1, False), (7, True)):
        x = torch.randn(2, t, 100, dtype=torch.float64).to(DEVICE, dtype)
        if transposed:
            x = x.transpose(0, 1).contiguous().transpose(0, 1)
        with use_impl("reference"):
            ref = model(x)
        with use_impl("two_phase"), use_kernels("triton"):
            out = model(x)
        assert_close(f"T={t}", out, ref, TOL[dtype] * (10 if dtype == torch.float64 else 3))


@pytest.mark.parametrize("variant", ["block", "full"])
@torch.no_grad()
def test_model_logits_with_fused_norms(variant: str) -> None:
    """The whole model without gradients: every read fused with its pre-norm or the final norm, on the
    kernels, against reference reads (fp64)."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=99, d_model=32, n_layers=3, n_heads=4, seq_len=16,
        residual={"variant": variant, "block_size": 4 if variant == "block" else None},
    )  # fmt: skip
    model = Transformer(cfg).double().to(DEVICE)
    model.residual.query.normal_(0, 0.5)  # trained-looking queries; zero init hides query errors
    tokens = torch.randint(0, 99, (2, 8), device=DEVICE)
    with use_impl("reference"):
        ref = model(tokens)
    with use_impl("two_phase"), use_kernels("triton"):
        assert_close("logits", model(tokens), ref, 1e-12)


def op_inputs(requires_grad: bool = False) -> tuple[tuple, tuple]:
    gen = torch.Generator().manual_seed(5)
    values = torch.randn(4, 5, 8, generator=gen).to(DEVICE)
    rstd = (torch.rand(4, 5, 1, generator=gen) + 0.5).to(DEVICE)
    queries = torch.randn(3, 8, generator=gen).to(DEVICE)
    o, p = (torch.randn(5, 8, generator=gen).to(DEVICE) for _ in range(2))
    lse, r_p = torch.randn(5, generator=gen).to(DEVICE), (torch.rand(5, generator=gen) + 0.5).to(DEVICE)
    w = (torch.rand(8, generator=gen) + 0.5).to(DEVICE)
    phase1 = (values, rstd, 3, queries, True)
    merge = (o.requires_grad_(requires_grad), lse, p, r_p, queries[0], w, EPS)
    return phase1, merge


def test_ops_pass_opcheck() -> None:
    """Schema, fake implementation and AOT dispatch of both ops (no autograd: inputs need no gradient)."""
    phase1, merge = op_inputs()
    torch.library.opcheck(triton_stacked.triton_stack_phase1, phase1)
    torch.library.opcheck(triton_stacked.triton_stack_phase1, (*phase1[:4], False))
    torch.library.opcheck(triton_stacked.triton_stack_merge, merge)
    torch.library.opcheck(triton_stacked.triton_stack_merge, (*merge[:5], None, 0.0))


def test_refuses_inputs_that_need_gradients() -> None:
    """No backward: under grad mode an input that requires a gradient is an error, not a silent detach."""
    phase1, merge = op_inputs(requires_grad=True)
    with pytest.raises(RuntimeError, match="no-grad inference kernel"):
        triton_stacked.stack_merge(*merge)
    with torch.no_grad():
        assert triton_stacked.stack_merge(*merge).shape == (5, 8)
    values, rstd, n, queries, need_lse = phase1
    with pytest.raises(RuntimeError, match="no-grad inference kernel"):
        triton_stacked.stack_phase1(values, rstd, n, queries.requires_grad_(), need_lse)


def test_refuses_bad_arguments() -> None:
    (values, rstd, _, queries, _), (o, lse, p, r_p, q, w, eps) = op_inputs()
    with torch.no_grad():
        with pytest.raises(ValueError, match="n must be in"):
            triton_stacked.stack_phase1(values, rstd, 5, queries, True)
        with pytest.raises(ValueError, match="contiguous stacks"):
            strided = values.transpose(0, 1).contiguous().transpose(0, 1)
            triton_stacked.stack_phase1(strided, rstd, 2, queries, True)
        with pytest.raises(ValueError, match="norm weight"):
            triton_stacked.stack_merge(o, lse, p, r_p, q, w.double(), eps)


@torch.no_grad()
def test_read_compiles_fullgraph() -> None:
    """A no-grad schedule on the kernels under ``fullgraph=True``: both ops stay graph nodes."""
    torch._dynamo.reset()
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm: torch.fx.GraphModule, _inputs: list[torch.Tensor]):
        graphs.append(gm)
        return gm.forward

    model = ToyStack("block", 32, 5, 2, torch.float32).to(DEVICE)
    x = torch.randn(2, 7, 32, device=DEVICE)
    try:
        with use_impl("two_phase"), use_kernels("triton"):
            eager = model(x)
            compiled = torch.compile(model, fullgraph=True, backend=backend)(x)
    finally:
        torch._dynamo.reset()
    targets = {str(node.target) for gm in graphs for node in gm.graph.nodes if node.op == "call_function"}
    assert {"attnres.triton_stack_phase1.default", "attnres.triton_stack_merge.default"} <= targets
    assert_close("compiled", compiled, eager, TOL[torch.float32])
