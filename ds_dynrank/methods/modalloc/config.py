"""Module allocation's knobs and its spec (pydantic only)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ds_dynrank.methods.spec import MethodSpec
from ds_dynrank.section import Section

Strategy = Literal["topk", "threshold", "multinomial", "discounted", "uniform"]


class ModAllocConfig(Section):
    score: Literal["activation", "gradient"] = "activation"
    """Module importance: `activation` = cumulative per-token L2 norm of the module's output (DynaLoRA, LoRA-drop
    style), `gradient` = cumulative L2 norm of its adapter gradients; summed over micro-batches and ranks."""

    strategy: Strategy = "topk"
    """Which modules train until the next event: the `k` most important (`topk`); the smallest top set whose
    normalised importance sums to >= `threshold`; `k` drawn with probability proportional to importance
    (`multinomial`) or to importance / times already chosen (`discounted`); `k` uniformly at random (`uniform`).
    Random draws happen on rank 0 from a seeded generator and are broadcast."""

    k: int | None = Field(None, ge=1)
    """Modules active at a time. Default: two thirds of the adapted modules (DynaLoRA's 16 of 24)."""

    threshold: float | None = Field(None, gt=0, le=1)
    """Strategy `threshold`: the importance mass p in (0, 1] the active set must cover (default 0.9)."""

    @model_validator(mode="after")
    def _strategy_fields(self) -> ModAllocConfig:
        if self.strategy == "threshold" and self.k is not None:
            raise ValueError("k: strategy 'threshold' sizes the active set by threshold, not k")
        if self.strategy != "threshold" and self.threshold is not None:
            raise ValueError(f"threshold: only used by strategy 'threshold', not {self.strategy!r}")
        return self


class ModAllocSpec(MethodSpec):
    name = "modalloc"
    summary = "a subset of modules trains at a time, chosen by importance (DynaLoRA)."
    implementation = "ds_dynrank.methods.modalloc.method:ModAlloc"
    section = ModAllocConfig
    section_doc = "Dynamic module allocation's knobs (method `modalloc`)."

    def check(self, cfg) -> None:
        if "budget" in cfg.model_fields_set:
            raise ValueError("budget: method modalloc keeps every rank; size the active set with modalloc.k")

    def weight_decay_problem(self, cfg, decay: float) -> str | None:
        if cfg.reshape.backend == "masked" and decay:
            return (
                f"{decay} with dynrank method 'modalloc' on the masked backend would shrink the adapters of "
                "inactive modules, which must stay still; set it to 0, or use dynrank.reshape.backend "
                '"physical" (inactive adapters leave the optimizer)'
            )
        return None

    def every(self, interval: int) -> dict:
        return {**super().every(interval), "modalloc": {"strategy": "discounted"}}


SPEC = ModAllocSpec()
