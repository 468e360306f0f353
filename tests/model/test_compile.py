"""``torch.compile`` with the depth-read kernels inside the graph: custom ops, training, decoding, CLI.

Tolerances: compiled against eager in fp32, the relative RMS error (``rel_err``) of the loss, of
every parameter gradient and of the logits must stay below ``TOL = 1e-5``: inductor reorders
floating-point sums (fused kernels, other reduction orders), so results are not bitwise equal; the
depth reads themselves run the same kernels in both.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from numerics import rel_err
from torch import Tensor

from attnres.cli import main
from attnres.distributed.config import ParallelConfig
from attnres.model import ModelConfig, Transformer, lm_loss
from attnres.model import compile as compile_module
from attnres.model.cache import KVCache
from attnres.model.generate import SamplingConfig, decode_step, generate, prefill
from attnres.ops import native
from attnres.ops.dispatch import use_impl, use_kernels
from attnres.ops.fused import fused_depth_read, source_rstd
from attnres.ops.native import cpu_kernels, native_attend, native_attend_backward
from attnres.storage.config import RESUME_MAY_CHANGE, LoopConfig, TrainConfig

TOL = 1e-5


pytestmark = pytest.mark.skipif(compile_module.cpp_compiler() is None, reason="inductor needs a C++ compiler")


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    """Every test compiles from scratch (and never meets another test's graphs or recompile limit)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def native_kernels() -> Iterator[None]:
    if os.environ.get("ATTNRES_KERNELS") == "torch" or cpu_kernels() is None:
        pytest.skip("native kernels off or not buildable")
    with use_kernels("native"):
        yield


def recording_inductor(graphs: list[torch.fx.GraphModule]) -> Callable:
    """An inductor backend that keeps every graph dynamo hands it."""
    from torch._inductor.compile_fx import compile_fx

    def backend(gm: torch.fx.GraphModule, inputs: list[Tensor]) -> Callable:
        graphs.append(gm)
        return compile_fx(gm, inputs)

    return backend


def ops_in(graphs: list[torch.fx.GraphModule]) -> set[str]:
    """Names of the ``attnres::`` custom ops called in ``graphs``."""
    return {
        str(node.target)
        for gm in graphs
        for node in gm.graph.nodes
        if node.op == "call_function" and "attnres" in str(node.target)
    }


def tiny_model(variant: str, **residual: object) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=61,
        d_model=16,
        n_layers=2,
        n_heads=2,
        seq_len=12,
        residual={"variant": variant, **residual},
    )
    model = Transformer(cfg)
    with torch.no_grad():  # off the init, where every depth read is a uniform average
        for p in model.residual.parameters():
            p.add_(torch.randn_like(p), alpha=0.3)
    return model


# --- the custom ops -------------------------------------------------------------------------------


def native_inputs(n: int = 3, m: int = 5, d: int = 8, s: int = 2, grad: bool = True) -> tuple:
    gen = torch.Generator().manual_seed(1)
    sources = [torch.randn(m, d, generator=gen, requires_grad=grad) for _ in range(n)]
    rstd = [torch.rand(m, generator=gen).add_(0.5).requires_grad_(grad) for _ in range(n)]
    queries = torch.randn(s, d, generator=gen, requires_grad=grad)
    return sources, rstd, queries


@pytest.mark.parametrize("grad", [True, False])
def test_native_attend_passes_opcheck(native_kernels: None, grad: bool) -> None:
    """Schema, fake implementation, autograd registration and AOT dispatch of ``attnres::native_attend``."""
    torch.library.opcheck(native_attend, native_inputs(grad=grad))


def test_native_attend_backward_passes_opcheck(native_kernels: None) -> None:
    sources, rstd, queries = native_inputs(grad=False)
    _, _, alpha, dots = native_attend(sources, rstd, queries)
    grads = [torch.randn(5, 8), torch.randn(5, 8)]
    torch.library.opcheck(
        native_attend_backward, (sources, rstd, queries, alpha, dots, grads, torch.randn(5, 2))
    )


@pytest.mark.parametrize("grad", [True, False], ids=["train", "inference"])
def test_reads_under_autocast_trace_into_one_graph(grad: bool) -> None:
    """bf16 autocast: the depth reads' autocast-off regions do not break the graph (they did, with
    an ExitStack, and a graph break inside the no-grad stacked reads then broke inductor)."""
    model = tiny_model("block", block_size=2)
    x = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(5))
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(grad):
        out = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    assert torch.isfinite(out).all()


def test_native_fake_impl_never_builds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tracing the op with fake tensors runs no kernel and no build."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    def no_build() -> None:
        raise AssertionError("the fake impl tried to build or load the kernels")

    monkeypatch.setattr(native, "cpu_kernels", no_build)
    with FakeTensorMode() as mode:
        sources, rstd, queries = (
            mode.from_tensor(t) if isinstance(t, Tensor) else t for t in native_inputs(grad=False)
        )
        outs, lse, alpha, dots = native_attend(
            [mode.from_tensor(v) for v in sources],
            [mode.from_tensor(r) for r in rstd],
            mode.from_tensor(queries),
        )
    assert outs.shape == (2, 5, 8) and lse.shape == (5, 2) and alpha.shape == dots.shape == (3, 5, 2)


def triton_interpreted() -> bool:
    """Whether the Triton kernels run here: Triton installed, and CUDA or its CPU interpreter."""
    from attnres.ops import triton as triton_ops

    return triton_ops.available() and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


@pytest.mark.skipif(not triton_interpreted(), reason="needs Triton (CUDA or TRITON_INTERPRET=1)")
def test_triton_ops_pass_opcheck() -> None:
    from attnres.ops.triton.autograd import (
        triton_attend,
        triton_attend_backward,
        triton_merge,
        triton_merge_backward,
    )

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sources, rstd, queries = (
        [t.detach().to(device).requires_grad_() for t in ts]
        if isinstance(ts, list)
        else ts.detach().to(device).requires_grad_()
        for ts in native_inputs(n=3, m=5, d=8, s=2)
    )
    torch.library.opcheck(triton_attend, (sources, rstd, queries))
    with torch.no_grad():
        _, lse, dots = triton_attend(sources, rstd, queries)
    grads = [torch.randn(5, 8, device=device) for _ in range(2)]
    args = (
        [v.detach() for v in sources],
        [r.detach() for r in rstd],
        queries.detach(),
        dots,
        lse,
        grads,
        torch.randn(5, 2, device=device),
    )
    torch.library.opcheck(triton_attend_backward, args)
    o, p, q = (torch.randn(5, 8, device=device, requires_grad=True) for _ in range(3))
    lse1, r_p = (
        torch.randn(5, device=device, requires_grad=True),
        torch.rand(5, device=device).add_(0.5).requires_grad_(),
    )
    torch.library.opcheck(triton_merge, (o, lse1, p, r_p, q[0].detach().requires_grad_()))
    with torch.no_grad():
        out, h, sig, dot = triton_merge(o, lse1, p, r_p, q[0])
    g = torch.randn(5, 8, device=device)
    torch.library.opcheck(triton_merge_backward, (g, out, p.detach(), r_p.detach(), sig, dot, q[0].detach()))


@pytest.mark.skipif(not triton_interpreted(), reason="needs Triton (CUDA or TRITON_INTERPRET=1)")
def test_triton_read_compiles_fullgraph() -> None:
    """A fused read on the Triton kernels under ``fullgraph=True``: the ops in the graph, equal results."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sources, _, _ = native_inputs(n=3, m=5, d=8, s=1)
    sources = [v.detach().to(device).requires_grad_() for v in sources]
    query, gain = torch.randn(8, device=device), torch.rand(8, device=device) + 0.5

    def read(vs: list[Tensor]) -> Tensor:
        return fused_depth_read(vs, query, gain, rstd=[source_rstd(v, 1e-6) for v in vs])

    graphs: list[torch.fx.GraphModule] = []
    with use_kernels("triton"):
        eager = read(sources)
        (g_eager,) = torch.autograd.grad(eager.square().sum(), sources[0])
        compiled = torch.compile(read, fullgraph=True, backend=recording_inductor(graphs))(sources)
        (g_comp,) = torch.autograd.grad(compiled.square().sum(), sources[0])
    assert "attnres.triton_attend.default" in ops_in(graphs)
    assert rel_err(compiled, eager) < TOL and rel_err(g_comp, g_eager) < TOL


# --- the model ------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["block", "full"])
def test_train_step_compiles_fullgraph_on_native_kernels(native_kernels: None, variant: str) -> None:
    """Forward + backward of the model under ``fullgraph=True``, the native op in the graph."""
    tokens = torch.randint(0, 61, (2, 13), generator=torch.Generator().manual_seed(2))
    x, y = tokens[:, :-1], tokens[:, 1:]
    eager_model, compiled_model = tiny_model(variant), tiny_model(variant)
    graphs: list[torch.fx.GraphModule] = []
    compiled = torch.compile(compiled_model, fullgraph=True, backend=recording_inductor(graphs))
    with use_impl("fused"):
        loss_eager = lm_loss(eager_model(x), y)
        loss_eager.backward()
        loss_comp = lm_loss(compiled(x), y)
        loss_comp.backward()
    assert "attnres.native_attend.default" in ops_in(graphs)
    assert rel_err(loss_comp, loss_eager) < TOL
    for (name, p), q in zip(eager_model.named_parameters(), compiled_model.parameters(), strict=True):
        assert rel_err(q.grad, p.grad) < TOL, name


@pytest.mark.parametrize("impl", ["fused", "two_phase"])
@pytest.mark.parametrize("variant", ["block", "full"])
def test_decode_step_compiles_fullgraph_on_native_kernels(
    native_kernels: None, variant: str, impl: str
) -> None:
    """One decode step after a prefill, compiled with ``fullgraph=True``: the fused read on the native
    op; the no-grad stacked reads (``two_phase``) as PyTorch ops that inductor fuses, since the
    native no-grad kernels are eager-only (a custom op costs ~25 µs a call from a compiled graph)."""
    model = tiny_model(variant, **({"block_size": 2} if variant == "block" else {})).eval()
    prompt = torch.randint(0, 61, (2, 5), generator=torch.Generator().manual_seed(3))
    nxt = torch.randint(0, 61, (2, 1), generator=torch.Generator().manual_seed(4))
    graphs: list[torch.fx.GraphModule] = []
    step = torch.compile(decode_step, fullgraph=True, dynamic=True, backend=recording_inductor(graphs))
    logits = {}
    with torch.no_grad(), use_impl(impl):
        for name, fn in (("eager", decode_step), ("compiled", step)):
            cache = KVCache(model.cfg, 2, 8)
            prefill(model, prompt, cache)
            logits[name] = fn(model, nxt, cache)
    assert ops_in(graphs) == ({"attnres.native_attend.default"} if impl == "fused" else set())
    assert rel_err(logits["compiled"], logits["eager"]) < TOL


@pytest.mark.parametrize("variant", ["prenorm", "block", "full"])
def test_compiled_generation_equals_eager_and_compiles_once(variant: str) -> None:
    """Greedy tokens equal eager's; calls of other prompt lengths and max_new_tokens reuse the graph.

    Before the spare cache slot, the last step of every call recompiled (its slice of the cache was
    the whole buffer), and a cache position that grows recompiled without ``dynamic=True``.
    """
    model = tiny_model(variant).eval()
    greedy = SamplingConfig(temperature=0)
    compiles = []
    with _count_frames(compiles):
        for prompt, n in (([1, 2, 3], 5), ([4, 5, 6, 7, 8], 6), ([9], 10)):
            assert generate(model, [prompt], n, greedy, compile=True) == generate(model, [prompt], n, greedy)
    assert len(compiles) == 1, compiles


class _count_frames:  # noqa: N801 - a context manager used like a function
    """Records each graph dynamo compiles (by a hook on inductor's entry point) into ``into``."""

    def __init__(self, into: list[int]) -> None:
        self.into = into

    def __enter__(self) -> None:
        from torch._dynamo.utils import counters

        self.counters = counters
        self.start = counters["stats"]["unique_graphs"]

    def __exit__(self, *exc: object) -> None:
        self.into.extend(range(self.counters["stats"]["unique_graphs"] - self.start))


# --- configuration, CLI, errors -------------------------------------------------------------------


def test_config_field_and_rules() -> None:
    assert LoopConfig().compile is False and "train.compile" in RESUME_MAY_CHANGE
    with pytest.raises(ValueError, match="parallel.pp > 1"):
        TrainConfig(train=LoopConfig(compile=True, batch_size=4), parallel=ParallelConfig(pp=2))


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_cli_train_compiled_matches_eager(tmp_path: Path, cache_dir: str) -> None:
    """``attnres train --train.compile=true``: three steps whose losses are eager's (fp32, ``TOL``)."""
    common = [
        "--preset",
        "tiny",
        "--model.residual.variant=block",
        "--train.steps=3",
        f"--data.cache_dir={cache_dir}",
    ]
    main(["train", *common, "--out", str(tmp_path / "eager")])
    main(["train", *common, "--train.compile=true", "--out", str(tmp_path / "compiled")])
    eager, compiled = metrics(tmp_path / "eager"), metrics(tmp_path / "compiled")
    assert [r["step"] for r in compiled] == [1, 2, 3]
    for a, b in zip(compiled, eager, strict=True):
        assert abs(a["loss"] - b["loss"]) <= TOL * abs(b["loss"]), (a["loss"], b["loss"])


def test_cli_done_when_recipe_trains_and_evaluates(tmp_path: Path, cache_dir: str) -> None:
    """Issue 13's recipe: bf16-mixed, block checkpointing, 4 accumulation steps, compiled, with
    Block AttnRes, through training and the (no-grad, stacked-read) evaluation."""
    run = tmp_path / "recipe"
    flags = [
        "--model.residual.variant=block",
        "--train.precision=bf16-mixed",
        "--train.activation_checkpointing=block",
        "--train.grad_accum=4",
        "--train.compile=true",
        "--train.steps=2",
        "--train.eval_every=2",
    ]
    main(["train", "--preset", "tiny", *flags, "--out", str(run), f"--data.cache_dir={cache_dir}"])
    result = json.loads((run / "result.json").read_text())
    assert math.isfinite(result["final_val_loss"])


def test_compile_without_cpp_compiler_is_one_clear_line(
    tmp_path: Path, cache_dir: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(shutil, "which", lambda _name: None)  # no compiler on PATH
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "train",
                "--preset",
                "tiny",
                "--train.compile=true",
                "--out",
                str(tmp_path / "r"),
                f"--data.cache_dir={cache_dir}",
            ]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "needs a C++ compiler" in err and "g++" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()  # refused before the run directory is made
    with pytest.raises(ValueError, match="needs a C\\+\\+ compiler"):
        generate(tiny_model("block").eval(), [[1, 2]], 2, compile=True)
