"""Single-process tests of the pipeline split, schedules and accounting (no process group needed)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import pytest
import torch

from attnres.distributed.accounting import (
    blocks_per_chunk,
    eq7_naive,
    eq8_cached,
    expected_blocks,
)
from attnres.distributed.pipeline import (
    SiteRows,
    check_message,
    forward_schedule,
    make_layout,
    op_messages,
    pack,
    schedule,
    schedule_units,
    split_model,
)
from attnres.model import ModelConfig, Transformer, lm_loss
from attnres.model import transformer as transformer_module
from attnres.ops.dispatch import use_impl
from attnres.residuals import ResidualConfig
from attnres.residuals.attnres import DepthState


def _model(
    variant: str = "block", block_size: int | None = 2, n_layers: int = 4, d: int = 32, **kw
) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=99,
        d_model=d,
        n_layers=n_layers,
        n_heads=2,
        seq_len=7,
        residual=ResidualConfig.for_variant(variant, block_size=block_size),
        **kw,
    )
    model = Transformer(cfg).double()
    with torch.no_grad():
        for p in model.residual.parameters():
            p.add_(torch.randn_like(p))
    return model


def _simulate(pp: int, vpp: int, M: int, plan: Callable = schedule, kinds: str = "FB") -> None:
    """Run every rank's op list with blocking receives and non-blocking sends; fail on deadlock."""
    C = pp * vpp
    ops = {r: plan(r, pp, vpp, M) for r in range(pp)}
    for r, rank_ops in ops.items():
        mine = {(k, c, m) for k in kinds for c in range(r, C, pp) for m in range(M)}
        assert sorted(rank_ops) == sorted(mine), f"rank {r} does not run each of its ops exactly once"
    done: set[tuple[str, int, int]] = set()
    heads = dict.fromkeys(ops, 0)

    def ready(kind: str, c: int, m: int) -> bool:
        if kind == "F":
            return c == 0 or ("F", c - 1, m) in done
        return ("F", c, m) in done and (c == C - 1 or ("B", c + 1, m) in done)

    while any(heads[r] < len(ops[r]) for r in ops):
        progressed = False
        for r in ops:
            if heads[r] < len(ops[r]) and ready(*ops[r][heads[r]]):
                done.add(ops[r][heads[r]])
                heads[r] += 1
                progressed = True
        assert progressed, f"deadlock at pp={pp} vpp={vpp} M={M}: heads {heads}"


@pytest.mark.parametrize("pp,vpp", [(1, 1), (2, 1), (4, 1), (2, 2), (2, 3), (3, 2), (4, 2)])
@pytest.mark.parametrize("rounds", [1, 2, 3])
def test_schedule_runs_every_op_once_without_deadlock(pp: int, vpp: int, rounds: int) -> None:
    _simulate(pp, vpp, rounds * pp)


@pytest.mark.parametrize("pp,vpp", [(2, 1), (4, 1), (2, 2), (3, 2), (4, 2)])
@pytest.mark.parametrize("M", [1, 3, 4])
def test_forward_schedule_runs_every_forward_once_without_deadlock(pp: int, vpp: int, M: int) -> None:
    _simulate(pp, vpp, M, lambda *args: [op for unit in forward_schedule(*args) for op in unit], kinds="F")


def _nccl_replay_deadlocks(
    pp: int, vpp: int, M: int, plan: Callable = schedule_units, grouped: bool = True
) -> bool:
    """Replay every rank's point-to-point groups as NCCL runs large messages; True on deadlock.

    The runner posts each unit's sends together with the next unit's receives as one group and
    waits for it (``PipelineRunner._exchange``). Model: a rank runs its groups one at a time; a
    message completes once its send and its receive are both posted in their ranks' current groups;
    a group ends when all its messages have. NCCL ignores tags and matches a pair's messages in
    order, so the order of sends from a to b must equal the order of b's receives from a (asserted).
    ``grouped=False`` posts every message on its own, in program order.
    """
    C = pp * vpp

    def groups(rank: int) -> list[list[tuple[str, int, tuple]]]:
        units = plan(rank, pp, vpp, M)
        posted = [[("recv", chunk % pp, msg) for op in units[0] for chunk, msg in op_messages(op, C)[0]]]
        for u, unit in enumerate(units):
            nxt = units[u + 1] if u + 1 < len(units) else []
            posted.append(
                [("send", chunk % pp, msg) for op in unit for chunk, msg in op_messages(op, C)[1]]
                + [("recv", chunk % pp, msg) for op in nxt for chunk, msg in op_messages(op, C)[0]]
            )
        if not grouped:
            posted = [[message] for group in posted for message in group]
        return [group for group in posted if group]

    queues = {r: groups(r) for r in range(pp)}
    for a, b in itertools.permutations(range(pp), 2):
        sent = [msg for group in queues[a] for kind, peer, msg in group if kind == "send" and peer == b]
        got = [msg for group in queues[b] for kind, peer, msg in group if kind == "recv" and peer == a]
        assert sent == got, f"ranks {a}->{b} post their messages in different orders"
    heads, finished = dict.fromkeys(queues, 0), {r: set() for r in queues}
    while True:
        live = {r: queues[r][heads[r]] for r in queues if heads[r] < len(queues[r])}
        if not live:
            return False
        progressed = False
        for r, group in live.items():
            for i, (kind, peer, msg) in enumerate(group):
                partner = ("recv" if kind == "send" else "send", r, msg)
                if i not in finished[r] and peer in live and partner in live[peer]:
                    finished[r].add(i)
                    progressed = True
        for r, group in live.items():
            if len(finished[r]) == len(group):
                heads[r], finished[r] = heads[r] + 1, set()
                progressed = True
        if not progressed:
            return True


@pytest.mark.parametrize("pp,vpp", list(itertools.product(range(2, 6), range(1, 5))))
@pytest.mark.parametrize("rounds", [1, 2, 3])
def test_schedules_cannot_deadlock_on_nccl(pp: int, vpp: int, rounds: int) -> None:
    """The training step's and evaluation's communication, replayed with NCCL's matching rules."""
    assert not _nccl_replay_deadlocks(pp, vpp, rounds * pp)
    assert not _nccl_replay_deadlocks(pp, vpp, rounds * pp - 1, forward_schedule)


def test_interleaved_schedule_needs_its_grouped_exchange() -> None:
    """Posted one message at a time, 1F1B's steady state deadlocks: both neighbours send first.

    (This is why the runner groups a forward-backward pair's messages, and why the replay is not
    vacuous.) GPipe happens to be safe either way.
    """
    assert _nccl_replay_deadlocks(2, 2, 4, grouped=False)
    assert not _nccl_replay_deadlocks(2, 1, 4, grouped=False)


def test_interleaved_schedule_is_1f1b_in_steady_state() -> None:
    ops = schedule(0, 2, 2, 8)
    kinds = "".join(k for k, _, _ in ops)
    assert kinds == "FFFF" + "FB" * 12 + "BBBB"  # warm-up 2(P-1-0) + (V-1)P = 4


def test_interleaved_schedule_refuses_ragged_microbatches() -> None:
    with pytest.raises(ValueError, match="multiple of --parallel.pp=2"):
        schedule(0, 2, 2, 3)


def test_fewer_sublayers_than_chunks_is_refused() -> None:
    with pytest.raises(ValueError, match="every chunk needs at least one sublayer"):
        make_layout(_model(n_layers=1), pp=2, vpp=2)
    with pytest.raises(ValueError, match="at least one sublayer"):
        make_layout(_model(), pp=2, vpp=1, bounds=(0, 0, 8))


def test_tied_embeddings_are_refused() -> None:
    with pytest.raises(ValueError, match="tie_embeddings=false"):
        make_layout(_model(tie_embeddings=True), pp=2)


def _as_received(state: object) -> object:
    """What a chunk gets over the wire: the sources only, without the sender's fast-path statistics."""
    return DepthState(blocks=state.blocks, partial=state.partial) if isinstance(state, DepthState) else state


# fp64; (logits, gradients) tolerances, relative, against the model's reference read. Chunks on the
# reference read repeat the model's forward op for op: bitwise logits. Fused chunks differ from the
# reference by the fused read's rounding, which depends on the CPU's vector width (measured logits
# ~1e-15 with AVX2; up to 2.5e-14 absolute at logit RMS 0.2 with AVX-512, the native kernel built
# for x86-64-v4; gradients ~1e-14). Logits are compared relative to their RMS, so a logit near zero
# is not held to a tighter bound than the rest.
CHUNK_IMPLS = {"reference": (0.0, 1e-12), "fused": (1e-12, 1e-10)}


@pytest.mark.parametrize(
    "variant,block_size,n_layers,pp,vpp",
    [("block", 3, 4, 2, 2), ("full", None, 3, 2, 2), ("prenorm", None, 4, 4, 2), ("block", 2, 4, 2, 1)],
)
@pytest.mark.parametrize("d", [32, 100])
@pytest.mark.parametrize("impl", list(CHUNK_IMPLS))
def test_chained_chunks_equal_the_reference_model(
    variant: str, block_size: int | None, n_layers: int, pp: int, vpp: int, d: int, impl: str
) -> None:
    """The chunks run back to back, each handed only the sources, give the model's logits and every gradient.

    With ``fused``, each chunk recomputes the received sources' ``rstd`` (the path under test).
    """
    logit_tol, grad_tol = CHUNK_IMPLS[impl]
    model = _model(variant, block_size, n_layers, d)
    layout, chunks = split_model(model, pp, vpp)
    tokens = torch.randint(0, 99, (2, 7), generator=torch.Generator().manual_seed(1))
    targets = tokens.roll(1, dims=1)
    state = tokens
    with use_impl(impl):
        for chunk in chunks:
            assert chunk.read_impl() == (impl if variant != "prenorm" else "reference")
            state = chunk(_as_received(state))
    with use_impl("reference"):
        ref_logits = model(tokens)
    scale = ref_logits.detach().pow(2).mean().sqrt().item()
    torch.testing.assert_close(state, ref_logits, rtol=logit_tol, atol=logit_tol * scale)
    lm_loss(state, targets).backward()
    lm_loss(ref_logits, targets).backward()
    ref = dict(model.named_parameters())
    seen: dict[str, int] = dict.fromkeys(ref, 0)
    for chunk in chunks:
        for local, p in chunk.named_parameters():
            name, rows = chunk.global_names()[local]
            expected = ref[name].grad if rows is None else ref[name].grad[list(rows)]
            torch.testing.assert_close(p.grad, expected, rtol=grad_tol, atol=grad_tol * 1e-2)
            seen[name] += 1
    assert all(seen.values()), f"parameters owned by no chunk: {[n for n, k in seen.items() if not k]}"


@pytest.mark.parametrize("mode", ["sublayer", "block"])
@pytest.mark.parametrize(
    "variant,block_size,n_layers,pp,vpp",
    [("block", 3, 4, 2, 2), ("full", None, 3, 2, 2), ("prenorm", None, 4, 2, 1)],
)
def test_chunks_under_activation_checkpointing_give_the_model_gradients(
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
    variant: str,
    block_size: int | None,
    n_layers: int,
    pp: int,
    vpp: int,
) -> None:
    """Chunks of a model set to recompute (``sublayer``, or ``block`` with groups cut by the chunk
    bounds: Block S=3 in chunks of 2 sublayers) give the gradients of the model without it (fp64)."""
    calls = []
    real = transformer_module.checkpoint
    monkeypatch.setattr(transformer_module, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = _model(variant, block_size, n_layers)
    model.set_activation_checkpointing(mode)
    _, chunks = split_model(model, pp, vpp)
    model.set_activation_checkpointing("none")
    tokens = torch.randint(0, 99, (2, 7), generator=torch.Generator().manual_seed(1))
    targets = tokens.roll(1, dims=1)
    state = tokens
    with use_impl("fused"):
        for chunk in chunks:
            state = chunk(_as_received(state))
        assert calls, "no sublayer was recomputed"
        calls.clear()
        ref_logits = model(tokens)
    assert not calls
    torch.testing.assert_close(state, ref_logits, rtol=1e-12, atol=1e-12)
    lm_loss(state, targets).backward()
    lm_loss(ref_logits, targets).backward()
    ref = dict(model.named_parameters())
    for chunk in chunks:
        for local, p in chunk.named_parameters():
            name, rows = chunk.global_names()[local]
            expected = ref[name].grad if rows is None else ref[name].grad[list(rows)]
            torch.testing.assert_close(p.grad, expected, rtol=1e-10, atol=1e-12)


def test_site_rows_refuse_an_unowned_site() -> None:
    rows = SiteRows(torch.arange(12.0).view(6, 2), sites=[2, 3])
    torch.testing.assert_close(rows[3], torch.tensor([6.0, 7.0]))
    with pytest.raises(IndexError, match=r"read site 1 belongs to another pipeline chunk"):
        rows[1]


def test_a_message_the_receiver_cannot_hold_is_refused() -> None:
    buf = pack([torch.zeros(2, 5, 7)] * 3)  # [3, B=2, T=5, d=7]
    check_message(buf, (3, 2, 5, 7), torch.float32, ("fwd", 1, 0))
    with pytest.raises(RuntimeError, match=r"bfloat16.*expects \(3, 2, 5, 7\) torch.float32.*autocast"):
        check_message(buf.bfloat16(), (3, 2, 5, 7), torch.float32, ("fwd", 1, 0))
    with pytest.raises(RuntimeError, match=r"\('bwd', 2, 1\) is \(3, 2, 5, 7\)"):
        check_message(buf, (2, 2, 5, 7), torch.float32, ("bwd", 2, 1))


def test_pack_makes_noncontiguous_boundary_grads_contiguous() -> None:
    base = torch.randn(2, 5, 7, dtype=torch.float64)
    odd = [
        base.transpose(1, 2),
        torch.zeros(1, 1, 5, dtype=torch.float64).expand(2, 7, 5),
        base[:, :, ::1].transpose(1, 2) * 2,
    ]
    assert not any(t.is_contiguous() for t in odd)
    buf = pack(odd)
    assert buf.is_contiguous() and buf.shape == (3, 2, 7, 5)
    for i, t in enumerate(odd):
        torch.testing.assert_close(buf[i], t, rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["block", "full"])
@pytest.mark.parametrize(
    "pp,vpp,blocks_per", [(2, 1, 1), (2, 2, 1), (2, 2, 2), (4, 2, 1), (2, 3, 1), (3, 2, 2)]
)
def test_aligned_layouts_match_eq7_and_eq8(variant: str, pp: int, vpp: int, blocks_per: int) -> None:
    """Chunks of whole blocks starting at block boundaries: the counts are the paper's formulas.

    ``"received"`` is exactly Eq. 8. ``"seen"`` also skips, on each of the ``(V-1)·P`` transitions
    into a later virtual stage, the ``N_p`` blocks the receiving rank sealed itself.
    """
    C = pp * vpp
    S = 1 if variant == "full" else 2
    n_layers = C * blocks_per * S / 2
    if n_layers != int(n_layers):
        pytest.skip("needs an even number of sublayers")
    layout = make_layout(_model(variant, S if variant == "block" else None, int(n_layers)), pp, vpp)
    n_p = blocks_per_chunk(layout)
    assert n_p == blocks_per
    assert sum(expected_blocks(layout, "off").values()) == eq7_naive(pp, vpp, n_p)
    assert sum(expected_blocks(layout, "received").values()) == eq8_cached(pp, vpp, n_p)
    assert sum(expected_blocks(layout, "seen").values()) == eq8_cached(pp, vpp, n_p) - (vpp - 1) * pp * n_p
    assert max(expected_blocks(layout, "received").values()) <= pp * n_p  # O(P) peak, not O(C)


def test_misaligned_blocks_counted_by_hand() -> None:
    """Block S=3 over 8 sublayers, 4 chunks of 2: boundaries at sublayers 0, 3, 6.

    Completed blocks after sublayer ``e`` (exclusive) are ``ceil(e / 3)``: chunk ends 2, 4, 6, 8
    give 1, 2, 2, 3; chunk 2 (sublayers 4, 5) seals no block. Entering chunks: 0, 1, 2, 2.
    """
    layout = make_layout(_model("block", 3, 4), pp=2, vpp=2)
    assert layout.blocks_out == tuple(math.ceil(e / 3) for e in (2, 4, 6, 8)) == (1, 2, 2, 3)
    assert layout.blocks_in == (0, 1, 2, 2)
    # off: every link carries blocks_out[j-1]
    assert expected_blocks(layout, "off") == {1: 1, 2: 2, 3: 2}
    # received: link 2 -> rank 0 held nothing from chunk 0's input; link 3 -> rank 1 holds the 1 block
    # that entered chunk 1
    assert expected_blocks(layout, "received") == {1: 1, 2: 2, 3: 1}
    # seen: rank 0 sealed b_0 in chunk 0, rank 1 ended chunk 1 with 2 blocks
    assert expected_blocks(layout, "seen") == {1: 1, 2: 1, 3: 0}


def test_layout_follows_the_scheme_bookkeeping() -> None:
    for S, (pp, vpp) in itertools.product([1, 2, 3, 5], [(2, 1), (2, 2), (3, 1)]):
        layout = make_layout(_model("block", S, 5), pp, vpp)
        for c in range(layout.n_chunks):
            assert layout.blocks_out[c] == math.ceil(layout.bounds[c + 1] / S)
