"""Process-group lifetimes: ``n`` local gloo processes (tests, CPU benchmarks), and a clean exit."""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, NoReturn

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

_ECHO_DELAY_S = 3.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(
    rank: int, fn: Callable[..., Any], world_size: int, port: int, timeout_s: float, args: tuple
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # n processes share the machine's cores
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
    try:
        fn(rank, world_size, *args)
    except BaseException:
        dist.destroy_process_group()
        raise  # mp.spawn reports it
    exit_process_group()


def exit_process_group() -> NoReturn:
    """Leave the process group with every other rank and end this process, exit status 0.

    Call it last, after every file is written and closed. The process ends without the
    interpreter's teardown: gloo's worker threads outlive ``destroy_process_group`` whenever
    anything still references the group (a DDP module, FSDP2's device mesh pinned by DTensor's
    caches), and a worker dropping a finished collective's Python-owned tensor takes the GIL; if the
    interpreter is being finalised by then, the thread is killed inside a C++ destructor and the
    process aborts ("terminate called without an active exception", SIGABRT or SIGBUS) after a
    clean run. Seen in ~3% of 2-rank FSDP2 test runs on the rank that exits first.

    If a peer has failed, the barrier's ``RuntimeError`` is re-raised after a 3 s pause, so that
    the launcher (mp.spawn, torchrun) reports the peer's own error first rather than this echo.
    """
    try:
        dist.barrier()  # nobody leaves while a peer may still be writing what it was sent
    except RuntimeError:
        time.sleep(_ECHO_DELAY_S)
        dist.destroy_process_group()
        raise
    dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_gloo(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 120.0) -> None:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` CPU processes with a gloo group.

    ``fn`` must be importable (module level) because processes are spawned, not forked. A hung
    collective fails after ``timeout_s`` seconds instead of blocking forever; that includes the
    barrier every rank passes after ``fn`` returns (:func:`exit_process_group`), so ranks must
    finish within ``timeout_s`` of each other.
    """
    mp.spawn(_entry, args=(fn, world_size, free_port(), timeout_s, args), nprocs=world_size, join=True)
