"""The run directory's guards: one writer at a time, a metrics file that survives crashes, a clean stop.

- :class:`RunDirLock`: an exclusive lock on ``OUT/.lock`` for the life of a run, so a second run
  into the same ``--out`` is refused and names the process that holds it. The lock is the kernel's
  (``flock``), released when its process dies, so a killed run never leaves a stale one.
- :func:`metrics_up_to`: the records of ``metrics.jsonl`` up to a checkpoint's step, rewritten
  through a temporary file and a rename; a torn last line (a crash or a full disk mid-write) is
  dropped with a warning.
- :class:`GracefulStop`: Ctrl-C or SIGTERM asks the loop to stop after the current step, so it can
  save a checkpoint; a second one interrupts at once.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
import warnings
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are not guarded against a second writer there
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".lock"


class RunDirBusy(FileExistsError):
    """Another process is training into the same run directory."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on Ctrl-C or SIGTERM after saving a checkpoint; ``--resume`` continues it."""

    def __init__(self, out: Path, step: int, saved: bool) -> None:
        self.out, self.step, self.saved = out, step, saved
        where = f"checkpoint at step {step} saved in {out}" if saved else f"no step of {out} finished"
        super().__init__(
            f"interrupted; {where}; continue with: attnres train --out {out} --resume "
            "(for attnres compare: the same compare command)"
        )

    def __reduce__(self) -> tuple[type, tuple[Path, int, bool]]:  # crosses compare --jobs' process pool
        return type(self), (self.out, self.step, self.saved)


class RunDirLock:
    """Hold ``run_dir/.lock`` exclusively while a run writes there (a context manager).

    Raises:
        RunDirBusy: on entry, when another live process holds it; the message names that process.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> RunDirLock:
        if fcntl is None:
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self.path.read_text(errors="replace").strip() or "an unknown process"
            os.close(fd)
            raise RunDirBusy(
                f"{self.path.parent} is in use by another attnres run ({holder}); wait for it to end, "
                "or choose another --out"
            ) from None
        owner = f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        os.ftruncate(fd, 0)
        os.write(fd, owner.encode())
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:  # the file stays: unlinking a lock file races with the next taker
            os.close(self._fd)  # closing releases the flock
            self._fd = None


def metrics_up_to(path: Path, step: int) -> list[dict[str, Any]]:
    """Keep the records of ``path`` (``metrics.jsonl``) up to ``step`` and return them.

    Records past ``step`` were written after the checkpoint being resumed and are dropped. The file
    is rewritten atomically (a temporary file, then a rename), so a kill during the rewrite keeps
    the old file whole.

    Raises:
        ValueError: a line other than the last is not a JSON record (naming the file and line).
    """
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            record["step"]  # noqa: B018 - every record has one
        except (json.JSONDecodeError, TypeError, KeyError):
            if number == len(lines):  # torn by a crash or a full disk mid-write: lose that step only
                warnings.warn(f"{path}: dropped an incomplete last line ({line[:60]!r})", stacklevel=2)
                break
            raise ValueError(
                f"{path} line {number} is not a metrics record ({line[:60]!r}); repair or delete the file"
            ) from None
        if record["step"] <= step:
            records.append(record)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)
    return records


class GracefulStop:
    """While active, Ctrl-C (SIGINT) and SIGTERM set :attr:`requested` instead of interrupting.

    The training loop checks the flag between steps, saves a checkpoint and stops, so a run stopped
    by hand or by a job scheduler resumes where it was. A second signal raises ``KeyboardInterrupt``
    at once (the last checkpoint on disk stays valid: checkpoints are swapped in atomically).
    Only the main thread can own signal handlers; elsewhere this does nothing.
    """

    _SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, log: Any = None) -> None:
        self.requested = False
        self._log = log or (lambda msg: print(msg, file=sys.stderr))
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self._log(
            f"{signal.Signals(signum).name}: stopping after this step with a checkpoint "
            "(send it again to stop at once)"
        )

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in self._SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, _t: type | None, _e: BaseException | None, _tb: TracebackType | None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
