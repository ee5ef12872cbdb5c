"""GoRA then L1RA's spec (pydantic only): no knobs of its own; it reads `dynrank.gora` and `dynrank.l1ra`."""

from __future__ import annotations

from ds_dynrank.methods.gora.config import SPEC as GORA
from ds_dynrank.methods.l1ra.config import SPEC as L1RA
from ds_dynrank.methods.spec import MethodSpec


class GoRAThenL1RASpec(MethodSpec):
    name = "gora_l1ra"
    summary = (
        "GoRA's one allocation after `gora.warmup_steps`, then L1RA's gated events every `schedule.interval` "
        "(both sections apply; the budget in parameters)."
    )
    implementation = "ds_dynrank.methods.gora_l1ra.method:GoRAThenL1RA"
    uses = (GORA.name, L1RA.name)
    gate = True
    grows = True
    budget_unit = "params"

    def check(self, cfg) -> None:
        if cfg.gate is False:
            raise ValueError("gate: method gora_l1ra needs gate: true (or leave gate unset)")
        if cfg.schedule.start is not None or cfg.schedule.kind != "periodic":
            raise ValueError(
                "schedule: method gora_l1ra starts its events at gora.warmup_steps: set that, and only "
                "schedule.interval / schedule.stop for L1RA's events after it"
            )
        cfg.check_cap_fits()

    def every(self, interval: int) -> dict:
        """GoRA after `interval` steps, then L1RA's events as often, pulled hard enough that ranks move."""
        return {**GORA.every(interval), "schedule": {"interval": interval}, L1RA.name: L1RA.every(interval)[L1RA.name]}


SPEC = GoRAThenL1RASpec()
