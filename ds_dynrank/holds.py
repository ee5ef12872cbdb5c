"""Test hooks: hold a run at a named point so that a test can signal or kill it exactly there, instead of racing a
running job with a timer. Off unless `DS_DYNRANK_HOLD` is set ("step:4": at the boundary of optimizer step 4, before
the stop check; "event:6": inside the event at applied step 6, after the backend reshaped, before it is recorded).

A held rank writes its PID to `$DS_DYNRANK_HOLD_FILE.rank<r>` (the test knows every rank is there, and whom to
signal), then waits until `release()` says so (a stop was agreed) or it is killed; after `TIMEOUT_S` it gives up
with an error.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from ds_dynrank import dist
from ds_dynrank.rundir import write_text

HOLD, HOLD_FILE = "DS_DYNRANK_HOLD", "DS_DYNRANK_HOLD_FILE"
TIMEOUT_S = 300.0


def requested(point: str, step: int) -> bool:
    return os.environ.get(HOLD, "") == f"{point}:{step}"


def hold(point: str, step: int, release: Callable[[], bool] | None = None, poll_s: float = 0.1) -> None:
    """Wait here if the environment asks for `point:step`; `release` (called every `poll_s`, on every rank at
    once: it may be collective) ends the wait."""
    if not requested(point, step):
        return
    marker = os.environ.get(HOLD_FILE)
    if marker:
        rank = dist.rank() if dist.is_initialized() else 0
        write_text(Path(f"{marker}.rank{rank}"), str(os.getpid()))  # atomic: a reader never sees it empty
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        if release is not None and release():
            return
        time.sleep(poll_s)
    raise RuntimeError(f"{HOLD}={point}:{step}: held for {TIMEOUT_S:.0f} s and no signal came")
