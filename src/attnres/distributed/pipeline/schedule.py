"""The order of one rank's pipeline ops, and the messages each op receives and sends.

An op is ``("F" | "B", chunk, microbatch)``; a message is ``("fwd" | "bwd", transition j,
microbatch)``, where transition ``j`` is the link into chunk ``j``. Training runs GPipe
(``vpp == 1``) or interleaved 1F1B (:func:`schedule`, grouped into communication units by
:func:`schedule_units`); evaluation runs forwards only (:func:`forward_schedule`).
"""

from __future__ import annotations

Op = tuple[str, int, int]  # ("F" | "B", chunk, microbatch)
Message = tuple[str, int, int]  # ("fwd" | "bwd", transition j = the link into chunk j, microbatch)


def schedule_units(rank: int, pp: int, vpp: int, n_microbatches: int) -> list[list[Op]]:
    """:func:`schedule`'s ops in communication units: a unit's sends and the next unit's receives
    are posted together (one ``batch_isend_irecv``).

    Each op is its own unit, except in interleaved 1F1B's steady state, where a forward and the
    backward after it form one. There neighbouring ranks each have a forward and a backward
    message for the other; posted one at a time, both ranks would send before either receives,
    which NCCL (it matches a pair's messages in order and cannot finish a large send before the
    receive is posted) can deadlock on. Posted as one group per 1F1B pair, they never wait on each
    other (``tests/distributed/test_pipeline_split.py`` replays every rank's groups to show it).
    """
    M = n_microbatches
    if vpp == 1:
        return [[("F", rank, m)] for m in range(M)] + [[("B", rank, m)] for m in range(M)]
    if M % pp:
        raise ValueError(
            f"interleaved 1F1B needs the number of micro-batches ({M}) to be a multiple of "
            f"--parallel.pp={pp}; change --parallel.microbatches"
        )
    total = M * vpp

    def op(kind: str, k: int) -> Op:
        group, within = divmod(k, pp * vpp)
        v = within // pp
        if kind == "B":
            v = vpp - 1 - v
        return (kind, v * pp + rank, group * pp + within % pp)

    warmup = total if pp == M else min(total, 2 * (pp - rank - 1) + (vpp - 1) * pp)
    units = [[op("F", k)] for k in range(warmup)]
    units += [[op("F", warmup + i), op("B", i)] for i in range(total - warmup)]
    return units + [[op("B", k)] for k in range(total - warmup, total)]


def schedule(rank: int, pp: int, vpp: int, n_microbatches: int) -> list[Op]:
    """The ordered ``("F" | "B", chunk, microbatch)`` ops of ``rank``.

    GPipe for ``vpp == 1`` (all forwards, then all backwards); otherwise interleaved 1F1B
    (Megatron-LM's order: micro-batches in groups of ``pp``, warm-up of
    ``2 (pp - rank - 1) + (vpp - 1) pp`` forwards, then one forward / one backward).
    """
    return [op for unit in schedule_units(rank, pp, vpp, n_microbatches) for op in unit]


def op_messages(op: Op, n_chunks: int) -> tuple[list[tuple[int, Message]], list[tuple[int, Message]]]:
    """What ``op`` receives before it runs and sends after: ``(peer chunk, message)`` lists.

    A forward of chunk ``c`` receives over transition ``c`` from chunk ``c - 1`` and sends over
    ``c + 1``; a backward receives the gradient over ``c + 1`` and sends it back over ``c``.
    """
    kind, c, m = op
    if kind == "F":
        recvs = [(c - 1, ("fwd", c, m))] if c > 0 else []
        sends = [(c + 1, ("fwd", c + 1, m))] if c < n_chunks - 1 else []
    else:
        recvs = [(c + 1, ("bwd", c + 1, m))] if c < n_chunks - 1 else []
        sends = [(c - 1, ("bwd", c, m))] if c > 0 else []
    return recvs, sends


def forward_schedule(rank: int, pp: int, vpp: int, n_microbatches: int) -> list[list[Op]]:
    """The ``("F", chunk, microbatch)`` ops of ``rank`` for a forward-only pass (evaluation), one per unit.

    Micro-batch by micro-batch, each through this rank's chunks in order. Every rank follows the
    same ``(microbatch, chunk)`` order and ``("F", c, m)`` waits only on ``("F", c - 1, m)``, which
    comes earlier in it, so it cannot deadlock; any number of micro-batches works.
    """
    return [[("F", c, m)] for m in range(n_microbatches) for c in range(rank, pp * vpp, pp)]
