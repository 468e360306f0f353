"""How spawned gloo workers end: with status 0, without the interpreter's teardown.

The teardown is skipped because gloo's worker threads can still release Python-owned tensors while
it runs, which aborted ~3% of 2-rank FSDP2 runs after they had finished cleanly (see
``exit_process_group``). A 3% race cannot be tested directly in a short suite; these tests pin
down the mechanism that removes it.
"""

from __future__ import annotations

import atexit
import os

import pytest
import torch.multiprocessing as mp

from attnres.distributed.launch import spawn_gloo


def _teardown_would_fail(rank: int, world_size: int) -> None:
    atexit.register(os._exit, 3)  # runs only if the interpreter is finalised


def _fails_on_rank_1(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("bad worker")


@pytest.mark.distributed
def test_workers_exit_without_interpreter_teardown() -> None:
    spawn_gloo(_teardown_would_fail, 2)  # would fail with exit status 3 if the teardown ran


@pytest.mark.distributed
def test_a_failing_worker_is_reported() -> None:
    with pytest.raises(mp.ProcessRaisedException, match="bad worker"):
        spawn_gloo(_fails_on_rank_1, 2, timeout_s=20.0)
