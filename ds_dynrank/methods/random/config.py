"""The random control arm's knobs and its spec (pydantic only)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from ds_dynrank.methods.spec import MethodSpec
from ds_dynrank.section import Section


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class RandomConfig(Section):
    moves: int | list[int] | None = None
    """Slots moved at each event: that many live slots pruned at random, as many grown in random modules. A list
    gives one count per event, in order (0: that event moves nothing), to replay a dynamic method's move sizes from
    its allocation_history.json (half of each event's slots_changed: `python -m ds_dynrank replay-moves RUN_DIR`
    prints it); it must cover every event of the run. Default: one per adapted module (ALoRA's default round)."""

    seed: int = Field(0, ge=0)
    """Seed of the decisions: each event draws from a generator seeded by (seed, step), so a run, and a resumed
    one, draws the same."""

    @field_validator("moves", mode="before")
    @classmethod
    def _moves(cls, value: Any) -> Any:
        """One clear line for any bad value, rather than one per member of the union."""
        if value is None or _is_int(value) and value >= 1:
            return value
        if isinstance(value, list) and value and all(_is_int(v) and v >= 0 for v in value):
            return value
        expected = "an integer >= 1, or a non-empty list of integers >= 0 (one per event)"
        raise ValueError(f"must be {expected}, got {value!r}")


class RandomSpec(MethodSpec):
    name = "random"
    summary = (
        "a control arm, not a method to use: a dynamic method's schedule and move sizes with random decisions "
        "(live slots pruned and modules grown uniformly at random), to separate the scores from the movement."
    )
    implementation = "ds_dynrank.methods.random.method:RandomReallocation"
    section = RandomConfig
    section_doc = "The random control arm's knobs (method `random`)."
    grows = True

    def check(self, cfg) -> None:
        cfg.check_cap_fits()


SPEC = RandomSpec()
