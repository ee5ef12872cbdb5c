"""The random control arm (issue #23): the ordinary schedule, `random.moves` slots moved at each event, every
decision drawn at random. Set beside a dynamic method at the same move sizes, it tells what the method's scores
bring from what merely moving rank brings.

Scores are the protocol's zeros (no scoring work, no collective). The draws come from a generator seeded by
(`random.seed`, step), so the method keeps no state: a resumed run draws what the uninterrupted one would have.
"""

from __future__ import annotations

import bisect

import torch

from ds_dynrank.allocation import Plan, random_plan
from ds_dynrank.errors import UserInputError
from ds_dynrank.methods.base import Event, Method
from ds_dynrank.schedule import Schedule


def decision_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def moves_at(moves: int | list[int], events: list[int], step: int) -> int:
    """The move count of the event at `step`: `moves` itself, or its entry for this event (an unscheduled step
    takes the entry of the next scheduled event, the last one past them all)."""
    if not isinstance(moves, list):
        return moves
    return moves[min(bisect.bisect_left(events, step), len(moves) - 1)]


class RandomReallocation(Method):
    def schedule(self, total_steps: int, steps_per_epoch: int | None) -> Schedule:
        """The ordinary schedule; a list of moves must cover every event that fires in the run."""
        schedule = super().schedule(total_steps, steps_per_epoch)
        moves = self.cfg.random.moves
        fired = [s for s in schedule.events() if s <= total_steps]
        if isinstance(moves, list) and len(moves) < len(fired):
            raise UserInputError(
                f"dynrank.random.moves: {len(moves)} entries, but the schedule fires {len(fired)} events in "
                f"{total_steps} steps (at steps {fired[0]}, {fired[1]}, ...): give one per event"
            )
        return schedule

    def decide(self, scores_S: torch.Tensor, event: Event) -> Plan:
        b, moves = event.bounds, self.cfg.random.moves
        events = self.schedule(event.total_steps, None).events()
        return random_plan(
            event.live,
            moves=len(event.live) if moves is None else moves_at(moves, events, event.step),
            generator=decision_generator(self.cfg.random.seed, event.step),
            floor=b.floor,
            cap_M=b.cap_M,
            cost_M=b.cost_M,
            unit=b.unit,
            carry=event.unspent(),
        )
