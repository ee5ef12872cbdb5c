"""When re-allocation events fire, in optimizer steps that were really applied (never mid-accumulation)."""

from __future__ import annotations

from dataclasses import dataclass

from ds_dynrank.errors import UserInputError


@dataclass(frozen=True)
class Schedule:
    start: int
    interval: int
    stop: int
    final: bool = False  # also fire at `stop` when the interval does not land on it (AdaLoRA's last mask)

    def due(self, step: int) -> bool:
        """True at start, start + interval, ... up to stop (inclusive); at stop too when `final`."""
        if self.final and step == self.stop:
            return True
        return self.start <= step <= self.stop and (step - self.start) % self.interval == 0

    def events(self) -> list[int]:
        steps = list(range(self.start, self.stop + 1, self.interval))
        return steps + [self.stop] if self.final and steps[-1:] != [self.stop] else steps


def resolve_schedule(
    start: int | None,
    interval: int | None,
    stop: int | None,
    *,
    total_steps: int,
    interval_ratio: float,
    kind: str = "periodic",
) -> Schedule:
    """Unset fields follow the method's default: every `interval_ratio` of the run (L1RA's rank_update_ratio),
    first event after one interval, last event before the final step (an event at the end would train nothing).
    `kind="once"`: a single event at `start`."""
    interval = interval or max(1, round(interval_ratio * total_steps))
    start = start or interval
    if kind == "once":
        return Schedule(start=start, interval=1, stop=start)
    stop = stop if stop is not None else max(start, total_steps - 1)
    return Schedule(start=start, interval=interval, stop=stop)


def check_fits(schedule: Schedule, total_steps: int, method: str) -> None:
    """A dynamic method whose first event falls after the run would silently train plain LoRA: refuse."""
    if schedule.start >= total_steps:
        raise UserInputError(
            f"dynrank.schedule: method {method!r} would first re-allocate at optimizer step {schedule.start}, but "
            f"the run has {total_steps} steps, so it would train plain LoRA; set dynrank.schedule.start (and "
            "interval) below the run length, or train longer"
        )
