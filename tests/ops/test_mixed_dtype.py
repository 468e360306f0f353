"""Mixed precision on every path: each variant × depth-read implementation × kernel set.

A bf16-autocast train step (forward, loss, backward) must run and match the fp32 step on the
same weights within bf16 tolerances, and so must the no-grad forward (for Block and Full
``two_phase`` that is the stacked inference path). Inside the depth reads every statistic is
fp32: a dispatch-mode spy records the dtype of every tensor each residual-scheme call and each
depth-read backward computes, and under autocast (where the stream is fp32: the embedding's
dtype, ``attnres.residuals.base.to_stream``) every one of them must be fp32. With bf16 weights
(``model.to(torch.bfloat16)``) the stream is bf16, and the statistics ops must still return fp32.

Variants without fast depth reads ignore ``impl`` and the kernels, so they run once; Block, Full
and SWA run the reference read plus ``fused`` and ``two_phase`` on each kernel set (SWA reads
``two_phase`` as ``fused``). The Triton column runs under Triton's interpreter on CPU.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import pytest
import torch
from numerics import rel_err
from torch.utils._python_dispatch import TorchDispatchMode

from attnres.model import ModelConfig, Transformer, lm_loss
from attnres.ops import fused, two_phase
from attnres.ops.dispatch import use_impl, use_kernels
from attnres.ops.native import cpu_kernels
from attnres.ops.triton import available as triton_available
from attnres.residuals import ResidualConfig
from attnres.residuals.base import ResidualScheme
from attnres.residuals.registry import variant_names

FAST = ("block", "full", "swa")
KERNELS = ("torch", "native", "triton")
#: relative RMS error against the fp32 step; measured worst over the grid (torch 2.13 CPU, d=32, T=16):
#: loss 2.1e-5, all gradients together 7.7e-3, the worst single parameter 2.4e-2 (mhc_lite/denseformer
#: static weights), no-grad logits 4.8e-3; Triton (interpreter) as the torch kernels
LOSS_TOL, GRAD_TOL, PARAM_TOL, LOGIT_TOL = 1e-3, 3e-2, 6e-2, 2e-2
#: aten ops that compute depth-read statistics: their outputs must be fp32 whatever the stream
STATS_OPS = {
    "mm", "bmm", "mv", "addmm", "matmul", "dot", "linalg_vecdot", "logsumexp", "_softmax",
    "sigmoid", "exp", "rsqrt", "linalg_vector_norm", "addcmul", "lerp", "sum", "mul", "sub", "add",
}  # fmt: skip


def cases() -> Iterator[tuple[str, str, str]]:
    for variant in variant_names():
        if variant not in FAST:
            yield variant, "reference", "torch"
            continue
        yield variant, "reference", "torch"
        for impl in ("fused", "two_phase"):
            for kernels in KERNELS:
                yield variant, impl, kernels


def case_id(case: tuple[str, str, str]) -> str:
    return "-".join(case)


def case_param(case: tuple[str, str, str]):
    """One grid point; the whole grid takes about 25 s on 2 CPU cores, the Triton column included."""
    return pytest.param(*case, id=case_id(case))


class DtypeSpy(TorchDispatchMode):
    """Records ``(op name, dtype)`` of every floating-point tensor an aten op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.seen.append((name, t.dtype))
        return out


@contextlib.contextmanager
def spy_on_depth_reads(monkeypatch: pytest.MonkeyPatch, scheme: ResidualScheme) -> Iterator[DtypeSpy]:
    """Run every call of the scheme's interface, and every depth-read backward, under one spy."""
    spy = DtypeSpy()

    def spied(fn: Callable) -> Callable:
        def run(*args, **kwargs):
            with spy:
                return fn(*args, **kwargs)

        return run

    for name in ("init_state", "layer_input", "update", "final"):
        monkeypatch.setattr(scheme, name, spied(getattr(scheme, name)))
    # the native and Triton kernels are custom ops whose backward formulas torch.library holds; they
    # compute inside their kernels, unseen by a dispatch mode anyway
    for fn in (fused._SourceRstd, fused._DepthAttend, two_phase._Merge):
        monkeypatch.setattr(fn, "backward", staticmethod(spied(fn.backward)))
    yield spy


def tiny_model(variant: str) -> Transformer:
    torch.manual_seed(0)
    # block_size 3 (Block): groups of 3 read sites, so two-phase merges run; 4 sublayers
    residual = ResidualConfig.for_variant(variant, block_size=3 if variant == "block" else None)
    model = Transformer(
        ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=2, seq_len=16, residual=residual)
    )
    with torch.no_grad():  # off the init, where every depth read is a uniform average
        for p in model.residual.parameters():
            p.add_(torch.randn_like(p), alpha=0.3)
    return model


def step(
    model: Transformer, tokens: torch.Tensor, autocast: bool
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        loss = lm_loss(model(tokens[:, :-1]), tokens[:, 1:])
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@contextlib.contextmanager
def kernel_set(kernels: str) -> Iterator[None]:
    if kernels == "native" and cpu_kernels() is None:
        pytest.skip("the native CPU kernels did not build")
    if kernels == "triton" and not (triton_available() and os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("Triton (under TRITON_INTERPRET=1) is not available")
    with use_kernels(kernels):
        yield


@pytest.mark.parametrize(("variant", "impl", "kernels"), [case_param(c) for c in cases()])
def test_bf16_autocast_matches_fp32(
    monkeypatch: pytest.MonkeyPatch, variant: str, impl: str, kernels: str
) -> None:
    model = tiny_model(variant)
    tokens = torch.randint(0, 61, (2, 17))
    with kernel_set(kernels), use_impl(impl):
        loss32, grads32 = step(model, tokens, autocast=False)
        with torch.no_grad():
            logits32 = model(tokens[:, :-1])
        with spy_on_depth_reads(monkeypatch, model.residual) as spy:
            loss16, grads16 = step(model, tokens, autocast=True)
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                logits16 = model(tokens[:, :-1])
    assert loss16.dtype == torch.float32 and torch.isfinite(loss16)
    assert rel_err(loss16, loss32) <= LOSS_TOL
    assert grads16.keys() == grads32.keys()
    flat16 = torch.cat([g.flatten() for g in grads16.values()])
    flat32 = torch.cat([g.flatten() for g in grads32.values()])
    assert rel_err(flat16, flat32) <= GRAD_TOL
    worst = max(grads32, key=lambda n: rel_err(grads16[n], grads32[n]) if grads32[n].norm() > 0 else 0.0)
    assert grads32[worst].norm() == 0 or rel_err(grads16[worst], grads32[worst]) <= PARAM_TOL, worst
    assert rel_err(logits16.float(), logits32) <= LOGIT_TOL
    # the residual stream is fp32 under autocast, so nothing in the residual connection is bf16 ...
    low = {name for name, dtype in spy.seen if dtype != torch.float32}
    if variant == "highway":  # ... except highway's gate projection (a d×d linear, not a depth read)
        low -= {"_to_copy", "linear", "addmm", "mm", "t", "view", "sigmoid", "_unsafe_view", "detach"}
    assert not low, f"{variant}/{impl}/{kernels}: low-precision tensors from {sorted(low)}"
    assert spy.seen  # the spy saw the scheme's ops


@pytest.mark.parametrize("variant", ["block", "full"])
@pytest.mark.parametrize(
    ("impl", "kernels"),
    [
        ("reference", "torch"),
        ("fused", "torch"),
        ("fused", "native"),
        ("two_phase", "torch"),
        ("two_phase", "native"),
    ],
)
def test_bf16_weights_forward_backward(
    monkeypatch: pytest.MonkeyPatch, variant: str, impl: str, kernels: str
) -> None:
    """``model.to(torch.bfloat16)``: a bf16 stream, fp32 statistics, gradients near the fp32 ones."""
    model = tiny_model(variant)
    tokens = torch.randint(0, 61, (2, 17))
    with kernel_set(kernels), use_impl(impl):
        loss32, grads32 = step(model, tokens, autocast=False)
        model.to(torch.bfloat16)
        with spy_on_depth_reads(monkeypatch, model.residual) as spy:
            loss16, grads16 = step(model, tokens, autocast=False)
            with torch.no_grad():
                out = model(tokens[:, :-1])
    assert out.dtype == torch.bfloat16 and torch.isfinite(loss16)
    assert all(g.dtype == torch.bfloat16 for g in grads16.values())
    assert rel_err(loss16, loss32) <= 2e-2
    flat16 = torch.cat([g.flatten() for g in grads16.values()])
    flat32 = torch.cat([g.flatten() for g in grads32.values()])
    assert rel_err(flat16, flat32) <= 8e-2
    # statistics stay fp32 even though the stream is bf16
    low_stats = {name for name, dtype in spy.seen if name in STATS_OPS and dtype != torch.float32}
    allowed = {"add", "sum"}  # the stream's own sums (partial + out) and grads summed in the stream dtype
    assert not low_stats - allowed, sorted(low_stats)
    if kernels == "torch" and impl != "reference":  # the native kernels compute inside C++, unseen
        assert any(name in {"mm", "mv", "bmm", "linalg_vecdot", "logsumexp"} for name, _ in spy.seen)


def test_old_code_is_caught_by_the_spy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The spy sees bf16 statistics when a depth read runs under autocast (as the old code did)."""
    from attnres.ops import precision

    monkeypatch.setattr(precision.torch, "is_autocast_enabled", lambda device: False)  # guard off
    model = tiny_model("block")
    tokens = torch.randint(0, 61, (2, 17))
    with use_kernels("torch"), use_impl("fused"), spy_on_depth_reads(monkeypatch, model.residual) as spy:
        step(model, tokens, autocast=True)
    assert ("mm", torch.bfloat16) in spy.seen
