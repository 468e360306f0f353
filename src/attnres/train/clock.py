"""A run's wall time over all its sessions, and the steps timed for its throughput."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunClock:
    """Wall time and throughput of one run, carried across resumes in the trainer state.

    Attributes:
        earlier_s: wall seconds of the run's earlier sessions (NaN for a checkpoint written before
            timing was saved: that time is unknown).
        timed_s: seconds of the timed steps, over all sessions.
        timed_steps: how many steps were timed. The first step of each session is not: it pays
            one-off warm-up costs (a kernel build, compilation).
        session_start: ``time.perf_counter()`` when this session's steps began (:meth:`start`).
    """

    earlier_s: float = 0.0
    timed_s: float = 0.0
    timed_steps: int = 0
    session_start: float = field(default_factory=time.perf_counter)

    @classmethod
    def resumed(cls, saved: dict[str, Any] | None) -> RunClock:
        """The clock of a run resumed from a trainer state's ``timing`` (``None``: a checkpoint
        written before timing was saved)."""
        if saved is None:
            return cls(earlier_s=math.nan)
        return cls(earlier_s=saved["seconds"], timed_s=saved["timed_s"], timed_steps=saved["timed_steps"])

    def start(self) -> None:
        """This session's steps begin now."""
        self.session_start = time.perf_counter()

    def record(self, seconds: float, first_of_session: bool) -> None:
        """One step took ``seconds``; it counts towards the throughput unless it was the session's first."""
        if not first_of_session:
            self.timed_s += seconds
            self.timed_steps += 1

    def state(self) -> dict[str, float]:
        """What a checkpoint saves: the run's seconds so far and the timed steps."""
        seconds = self.earlier_s + time.perf_counter() - self.session_start
        return {"seconds": seconds, "timed_s": self.timed_s, "timed_steps": self.timed_steps}

    def tokens_per_s(self, tokens_per_step: int) -> float:
        """Training throughput over the timed steps (NaN if none was timed)."""
        return tokens_per_step * self.timed_steps / self.timed_s if self.timed_s else math.nan
