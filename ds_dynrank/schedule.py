"""When re-allocation events fire, in optimizer steps that were really applied (never mid-accumulation)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    start: int
    interval: int
    stop: int

    def due(self, step: int) -> bool:
        """True at start, start + interval, ... up to stop (inclusive)."""
        return self.start <= step <= self.stop and (step - self.start) % self.interval == 0

    def events(self) -> list[int]:
        return list(range(self.start, self.stop + 1, self.interval))


def resolve_schedule(start: int | None, interval: int | None, stop: int | None, *, total_steps: int,
                     interval_ratio: float) -> Schedule:  # fmt: skip
    """Unset fields follow the method's default: every `interval_ratio` of the run (L1RA's rank_update_ratio),
    first event after one interval, last event before the final step (an event at the end would train nothing)."""
    interval = interval or max(1, round(interval_ratio * total_steps))
    start = start or interval
    stop = stop if stop is not None else max(start, total_steps - 1)
    return Schedule(start=start, interval=interval, stop=stop)
