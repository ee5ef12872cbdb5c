"""GoRA's knobs and its spec (pydantic only)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ds_dynrank.methods.spec import MethodSpec
from ds_dynrank.section import Section


class GoRAConfig(Section):
    warmup_steps: int = Field(8, ge=1)
    """Optimizer steps whose micro-batches' base-weight gradients are summed (over ranks too); the single
    allocation event fires right after the last of them, and training goes on as plain LoRA at the new ranks."""

    importance: Literal["sensitivity", "grad_norm"] = "sensitivity"
    """Module importance from the summed gradient G of its frozen weight W: `sensitivity` = mean |W * G| (the
    paper's), `grad_norm` = the Frobenius norm of G (needs no W)."""


class GoRASpec(MethodSpec):
    name = "gora"
    summary = (
        "one allocation from the base weights' gradients over the first steps, ranks proportional to importance "
        "under the parameter budget (GoRA, arXiv 2502.12171)."
    )
    implementation = "ds_dynrank.methods.gora.method:GoRA"
    section = GoRAConfig
    section_doc = "GoRA's knobs (method `gora`)."
    grows = True
    budget_unit = "params"

    def check(self, cfg) -> None:
        if "schedule" in cfg.model_fields_set:
            raise ValueError("schedule: method gora allocates once, right after gora.warmup_steps: set that instead")
        cfg.check_cap_fits()

    def every(self, interval: int) -> dict:
        """One event, after `interval` steps (GoRA never allocates twice)."""
        return {"gora": {"warmup_steps": interval}}


SPEC = GoRASpec()
