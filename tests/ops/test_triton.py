"""Triton kernels against the reference and the PyTorch fast path.

Without CUDA they run on CPU under Triton's interpreter (``tests/conftest.py`` turns it on before
anything imports Triton); with CUDA, on the GPU. Every buffer the kernels allocate is NaN-filled
and checked after each test, so an element a kernel forgets to write fails loudly. Sizes are
tiny: the interpreter runs each program in numpy. A separate test compiles every kernel for a GPU
(sm_90) without one, which the interpreter cannot check (it runs any Python).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

# helpers shared with the PyTorch fast-path tests (same directory, on sys.path under pytest)
from test_fast_reads import (  # noqa: E402
    ToyStack,
    assert_close,
    assert_grads_close,
    make_query_gain,
    make_sources,
    run_toy,
)
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from attnres.ops.dispatch import kernels_for, use_kernels  # noqa: E402
from attnres.ops.fused import _DepthAttend, depth_attend, fused_depth_read, source_rstd  # noqa: E402
from attnres.ops.native import cpu_kernels  # noqa: E402
from attnres.ops.reference import depth_read  # noqa: E402
from attnres.ops.triton import autograd as triton_autograd  # noqa: E402
from attnres.ops.triton import kernels  # noqa: E402
from attnres.ops.two_phase import phase1, phase2_merge  # noqa: E402

if isinstance(kernels.merge_kernel, InterpretedFunction):
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip("no CUDA, and Triton was imported without TRITON_INTERPRET=1", allow_module_level=True)

DTYPES = [torch.float64, torch.float32, torch.bfloat16]
# dtype -> max relative RMS error of outputs and gradients (as in test_fast_reads.py)
TOL = {torch.float64: 1e-12, torch.float32: 3e-5, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def nan_buffers(monkeypatch: pytest.MonkeyPatch):
    """Fill every kernel buffer with NaN; after the test, none may still hold one."""
    buffers = []

    def poisoned(shape, dtype, device):
        buffers.append(torch.full(shape, float("nan"), dtype=dtype, device=device))
        return buffers[-1]

    monkeypatch.setattr(triton_autograd, "_empty", poisoned)
    yield buffers
    for i, b in enumerate(buffers):
        assert not b.isnan().any(), f"buffer {i} {tuple(b.shape)} {b.dtype}: elements never written"


def grads(outputs, leaves, grad_outputs) -> tuple[torch.Tensor, ...]:
    # the reads of a group share phase 1's graph, so it must outlive each read's backward
    return torch.autograd.grad(outputs, leaves, grad_outputs, retain_graph=True, allow_unused=True)


def leaves_on_device(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The test's CPU-made leaves as leaves on :data:`DEVICE`."""
    return [t.detach().to(DEVICE).requires_grad_() for t in tensors]


def randn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("n", "t", "d", "s"), [
    (1, 7, 32, 1), (2, 1, 100, 2), (5, 7, 100, 3), (33, 7, 32, 2), (9, 1, 1168, 1), (3, 1, 32, 9),
])  # fmt: skip
def test_attend_matches_torch(dtype: torch.dtype, n: int, t: int, d: int, s: int, nan_buffers) -> None:
    """The kernel-level op: outputs, lse and the gradients of queries, every source and every rstd.

    ``n = 33`` takes five launches per pass (eight source slots each), ``s = 9`` two autograd calls.
    """
    sources = leaves_on_device(*make_sources(n, t, d, dtype))
    rstd = leaves_on_device(*(source_rstd(v, 1e-6) for v in sources))
    (queries,) = leaves_on_device(make_query_gain(d, s)[0].to(rstd[0].dtype))
    leaves = [queries, *sources, *rstd]
    grad_outs = [randn(2, t, d, dtype=queries.dtype, seed=2 + i) for i in range(s)]
    grad_lse = randn(2, t, s, dtype=queries.dtype, seed=1)

    *ref_outs, ref_lse = _DepthAttend.apply(queries, n, *sources, *rstd)  # PyTorch ops
    ref_grads = grads([*ref_outs, ref_lse], leaves, [*grad_outs, grad_lse])
    with use_kernels("triton"):
        outs, lse = depth_attend(sources, rstd, queries)
    got_grads = grads([*outs, lse], leaves, [*grad_outs, grad_lse])

    assert nan_buffers, "the kernels allocated nothing: the NaN fixture is not reaching them"
    tol = TOL[dtype]
    for i, (o, ro) in enumerate(zip(outs, ref_outs, strict=True)):
        assert o.dtype == ro.dtype and o.shape == ro.shape
        assert_close(f"output {i}", o, ro, tol)
    assert_close("lse", lse, ref_lse, tol)
    names = ["d queries"] + [f"d source {j}" for j in range(n)] + [f"d rstd {j}" for j in range(n)]
    for name, g, rg in zip(names, got_grads, ref_grads, strict=True):
        assert g.dtype == rg.dtype, name
        assert_close(name, g, rg, tol)


def test_attend_reads_strided_queries() -> None:
    """``depth_attend`` is public: queries ``[S, d]`` laid out column-major give the same answer."""
    n, t, d, s = 10, 3, 100, 3
    sources = leaves_on_device(*make_sources(n, t, d, torch.float64))
    rstd = leaves_on_device(*(source_rstd(v, 1e-6) for v in sources))
    (queries,) = leaves_on_device(make_query_gain(d, s)[0].double())
    strided = queries.t().contiguous().t()  # [S, d] values, [d, S] memory
    assert not strided.is_contiguous()
    grad_outs = [randn(2, t, d, dtype=torch.float64, seed=2 + i) for i in range(s)]
    *ref_outs, _ = _DepthAttend.apply(queries, n, *sources, *rstd)
    ref_grad = grads(ref_outs, [queries], grad_outs)[0]
    with use_kernels("triton"):
        outs, _ = depth_attend(sources, rstd, strided)
    for i, (o, ro) in enumerate(zip(outs, ref_outs, strict=True)):
        assert_close(f"output {i}", o, ro, TOL[torch.float64])
    assert_close("d queries", grads(list(outs), [queries], grad_outs)[0], ref_grad, TOL[torch.float64])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("n", "t", "d"), [(1, 7, 32), (2, 1, 100), (5, 7, 100), (33, 7, 32), (9, 1, 1168)])
def test_read_matches_reference(dtype: torch.dtype, n: int, t: int, d: int) -> None:
    """One fused read on the kernels against the oracle: output, and gradients of sources, query, gain."""
    sources = leaves_on_device(*make_sources(n, t, d, dtype))
    q, gain = leaves_on_device(*make_query_gain(d))
    grad_out = randn(2, t, d, dtype=dtype, seed=2)
    leaves = [*sources, q, gain]
    ref = depth_read(sources, q, gain, 1e-6)
    ref_grads = grads(ref, leaves, grad_out)
    with use_kernels("triton"):
        out = fused_depth_read(sources, q, gain, 1e-6)
    assert out.dtype == dtype
    tol = TOL[dtype]
    assert_close("output", out, ref, tol)
    names = [f"d source {i}" for i in range(n)] + ["d query", "d gain"]
    for name, g, rg in zip(names, grads(out, leaves, grad_out), ref_grads, strict=True):
        if n == 1 and name in ("d query", "d gain"):
            assert g.abs().max() < 1e-6, "a one-source read is the identity: no query gradient"
            continue
        assert_close(name, g, rg, tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("n_blocks", "s", "d"), [(1, 1, 32), (3, 3, 100), (2, 2, 1168), (32, 2, 32)])
def test_phase1_plus_merge_matches_reference_and_torch(
    dtype: torch.dtype, n_blocks: int, s: int, d: int
) -> None:
    """Every read of a group: phase 1 and the merge on the kernels, against the oracle and the torch ops."""
    *blocks, partial = leaves_on_device(*make_sources(n_blocks + 1, 7, d, dtype))
    queries, gains = leaves_on_device(*make_query_gain(d, s))
    leaves = [*blocks, partial, queries, gains]
    tol = TOL[dtype]
    results = {}
    for kernels_ in ("torch", "triton"):
        with use_kernels(kernels_):
            rstd = [source_rstd(b, 1e-6) for b in blocks]
            outs, lse = phase1(blocks, rstd, queries, gains)
            r_p = source_rstd(partial, 1e-6)
            reads = [phase2_merge(outs[i], lse[..., i], partial, r_p, queries[i], gains[i]) for i in range(s)]
        results[kernels_] = reads
    for i in range(s):
        grad_out = randn(2, 7, d, dtype=dtype, seed=3 + i)
        ref = depth_read([*blocks, partial], queries[i], gains[i])
        checks = {"reference": (ref, grads(ref, leaves, grad_out))}
        for kernels_, reads in results.items():
            checks[kernels_] = (reads[i], grads(reads[i], leaves, grad_out))
        out, got = checks.pop("triton")
        assert out.dtype == dtype
        for against, (ref_out, ref_grads) in checks.items():
            assert_close(f"read {i} vs {against}: output", out, ref_out, tol)
            assert_grads_close(f"read {i} vs {against}", got, ref_grads, tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize(("variant", "n_sublayers", "block_size"), [
    ("full", 7, None), ("block", 7, 2), ("block", 7, 3), ("block", 9, 8),
])  # fmt: skip
def test_scheme_on_kernels_equals_per_read(
    dtype: torch.dtype, variant: str, n_sublayers: int, block_size: int | None
) -> None:
    """A whole schedule (S = 1, 2, 3, 8; L not a multiple of S) on the kernels equals reference reads."""
    model = ToyStack(variant, 32, n_sublayers, block_size, dtype).to(DEVICE)
    x = randn(2, 7, 32, dtype=dtype, seed=4)
    ref, ref_grads = run_toy("reference", model, x)
    tol = TOL[dtype] * (10 if dtype == torch.float64 else 3)  # errors compound over L sublayers
    for impl in ("fused", "two_phase"):
        with use_kernels("triton"):
            out, got = run_toy(impl, model, x)
        assert_close(f"{impl} output", out, ref, tol)
        names = ["d input", "d query", "d key_gain", "d weights"]
        for name, g, rg in zip(names, got, ref_grads, strict=True):
            assert_close(f"{impl} {name}", g, rg, tol)


def test_kernel_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.zeros(2, 3)
    expected = "native" if cpu_kernels() is not None else "torch"
    assert kernels_for(x) == expected, "CPU tensors use the native kernels when they build, else PyTorch ops"
    with use_kernels("triton"):
        assert kernels_for(x) == "triton"
        with use_kernels("torch"):
            assert kernels_for(x) == "torch"
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="need CUDA tensors, or TRITON_INTERPRET=1"):
            kernels_for(x)
    with use_kernels("native"), pytest.raises(ValueError, match="'native' are CPU kernels"):
        kernels_for(torch.zeros(2, 3, device="meta"))
    with pytest.raises(ValueError, match="valid: auto, torch, triton, native"), use_kernels("cuda"):
        pass


@pytest.mark.slow  # ~30 s on 2 cores; ./run.sh test (CI) runs it
def test_kernels_compile_for_gpu() -> None:
    """Every kernel, training and no-grad, compiles to a cubin for sm_90 (ptxas ships with Triton), in a
    process without the interpreter: the interpreter runs any Python, so it cannot catch what the GPU
    compiler rejects."""
    script = textwrap.dedent("""
        import re
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from attnres.ops.triton import kernels as k

        STREAM = re.compile(r"^(v|dv)[0-7]$|^(p|out|dp|g|w)_ptr$")  # stream-dtype pointers
        INTS = {"M", "d", "S", "n", "o_row", "lse_step", "p_row", "rp_step"}
        ATTEND = dict(N_SLOTS=8, S=3, S_PAD=4, BLOCK_M=8, BLOCK_D=128, ACCUM=True)
        MERGE = dict(BLOCK_M=16, BLOCK_D=256)
        STACK = dict(BLOCK_M=4, BLOCK_S=8, BLOCK_D=128)  # the no-grad reads over a stack
        variants = [
            (k.attend_logits_kernel, ATTEND), (k.attend_output_kernel, ATTEND),
            (k.attend_grad_stats_kernel, ATTEND), (k.attend_grad_kernel, ATTEND),
            (k.merge_kernel, dict(MERGE, SAVE_H=True)), (k.merge_grad_kernel, MERGE),
            (k.stack_logits_kernel, STACK), (k.stack_output_kernel, dict(STACK, NEED_LSE=True)),
        ]
        variants += [  # the merge + norm: a row in one tile, and swept in tiles
            (k.stack_merge_kernel, dict(BLOCK_M=m, BLOCK_D=bd, NORM=norm, ONE_TILE=one))
            for m, bd, one in [(2, 2048, True), (4, 1024, False)] for norm in (True, False)
        ]
        for stream, cd in [("bf16", "fp32"), ("fp64", "fp64")]:
            for kernel, consts in variants:
                sig = {a: "constexpr" if a in consts else "i32" if a in INTS else "fp32" if a == "eps"
                       else "*" + (stream if STREAM.match(a) else cd) for a in kernel.arg_names}
                src = ASTSource(kernel, sig, constexprs=consts)
                assert triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["cubin"]
        print("compiled")
    """)
    env = {name: v for name, v in os.environ.items() if name != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9 warns when it is unset
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
