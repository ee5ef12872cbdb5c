"""Preemption: a cluster ends a job with SIGTERM (SLURM's time limit, `scancel`, a launcher passing on its own
SIGTERM) or warns it first with the signal the job asked for (`--signal=USR1@120`), to one process or to all of them.

The handler only records the signal. It loads no torch, so the job installs it first of all: a warning that comes
while the process is still importing or loading the model is kept and honoured at the first step. Every rank learns
of it at the next optimizer-step boundary through one collective (`StopRequest.agreed`), so no rank stops mid-
collective or mid-event, and the job checkpoints that step, commits `latest` and exits with `EXIT_PREEMPTED`. A
second signal while the checkpoint is written changes nothing: the save goes on, and `latest` is committed only
after every rank has written (SIGKILL then leaves the previous one).
"""

from __future__ import annotations

import signal
import threading

from ds_dynrank.errors import EXIT_PREEMPTED, Preempted

__all__ = ["EXIT_PREEMPTED", "SIGNALS", "Preempted", "StopRequest"]

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Records SIGTERM / SIGUSR1 in this process; `agreed()` tells every rank whether any rank got one."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> StopRequest:
        """Catch the signals (only the main thread may; elsewhere the process keeps its handlers)."""
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._record)
        return self

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _record(self, signum: int, frame) -> None:
        if self.signum is None:  # the first one names the stop; later ones (a launcher passing it on) change nothing
            self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "none"

    def agreed(self, device=None) -> list[int]:
        """Collective, at an optimizer-step boundary on every rank: the ranks that were signalled (empty: go on)."""
        from ds_dynrank import dist

        return (
            dist.ranks_where(self.signum is not None, device=device)
            if dist.is_initialized()
            else ([0] if self.signum is not None else [])
        )
