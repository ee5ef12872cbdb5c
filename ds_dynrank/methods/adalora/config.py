"""The AdaLoRA-style scorer's knobs and its spec (pydantic only)."""

from __future__ import annotations

from pydantic import Field

from ds_dynrank.methods.spec import MethodSpec
from ds_dynrank.section import Section


class AdaLoRAConfig(Section):
    target_r: float | None = Field(None, gt=0)
    """Average rank per module at the end of the budget schedule (PEFT's target_r). Default: 2/3 of r (PEFT's
    init_r 12 -> target_r 8)."""

    tinit: int | None = Field(None, ge=0)
    """Steps of warm-up before any pruning (PEFT's tinit). Default: 10% of --max_steps."""

    tfinal: int | None = Field(None, ge=0)
    """Steps at the end trained at the final allocation (PEFT's tfinal). Default: 20% of --max_steps."""

    delta_t: int | None = Field(None, ge=1)
    """Steps between allocation events during the cubic schedule (PEFT's deltaT). Default: 1% of --max_steps,
    at least 1."""

    beta1: float = Field(0.85, gt=0, lt=1)
    """EMA factor of the sensitivity |w * grad| (PEFT's beta1)."""

    beta2: float = Field(0.85, gt=0, lt=1)
    """EMA factor of its uncertainty |I - EMA(I)| (PEFT's beta2)."""


class AdaLoRASpec(MethodSpec):
    name = "adalora"
    summary = "AdaLoRA's sensitivity x uncertainty scores with its cubic budget schedule (arXiv 2303.10512)."
    implementation = "ds_dynrank.methods.adalora.method:AdaLoRA"
    section = AdaLoRAConfig
    section_doc = "AdaLoRA-style scorer's knobs (method `adalora`)."
    gate = True

    def check(self, cfg) -> None:
        if "schedule" in cfg.model_fields_set:
            raise ValueError(
                "schedule: method adalora follows its cubic schedule: set adalora.tinit, adalora.tfinal and "
                "adalora.delta_t instead"
            )
        if cfg.budget.unit != "rank":
            raise ValueError("budget.unit: method adalora counts its budget in ranks (PEFT's target_r)")
        target = cfg.adalora.target_r
        if target is not None and target > cfg.r:
            raise ValueError(f"adalora.target_r ({target}) must be <= r ({cfg.r}): AdaLoRA only prunes")

    def every(self, interval: int) -> dict:
        """The cubic schedule compressed: an event every `interval` steps from the first, no final plateau."""
        return {"adalora": {"tinit": interval - 1, "tfinal": 0, "delta_t": interval}}


SPEC = AdaLoRASpec()
