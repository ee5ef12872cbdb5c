"""ALoRA's knobs and its spec (pydantic only)."""

from __future__ import annotations

from pydantic import Field

from ds_dynrank.methods.spec import MethodSpec
from ds_dynrank.section import Section


class ALoRAConfig(Section):
    rounds: int = Field(8, ge=1)
    """N_A: allocation rounds (prune, then grow the modules that lost nothing), one every K2 (paper: up to 8)."""

    prune_per_round: int | None = Field(None, ge=1)
    """n_A: ranks pruned per round, the lowest AB-LoRA importance first, and handed to modules that lost none.
    Default: the number of adapted modules (the paper's 1 x N_mod)."""

    val_samples: int = Field(32, ge=1)
    """|B_val|: examples in the fixed scoring batch, held out of the training data (paper: 32)."""

    variants_per_forward: int = Field(4, ge=1)
    """Ablation variants (rank removed, or kept alone) evaluated in one batched forward, through per-example
    slot masks: larger is faster and needs variants_per_forward x val_samples sequences of activation memory."""

    k1_epochs: float = Field(1.0, gt=0)
    """K1: training before the first round, in epochs (paper: 1), when schedule.start is unset."""

    k2_epochs: float = Field(0.25, gt=0)
    """K2: training between rounds, in epochs (paper: 0.25), when schedule.interval is unset."""


class ALoRASpec(MethodSpec):
    name = "alora"
    summary = (
        "AB-LoRA ablation importance per rank, prune the lowest and grow modules that lost none (arXiv 2403.16187)."
    )
    implementation = "ds_dynrank.methods.alora.method:ALoRA"
    section = ALoRAConfig
    section_doc = "ALoRA's knobs (method `alora`)."
    grows = True
    validation_field = "alora.val_samples"

    def validation_samples(self, cfg) -> int:
        return cfg.alora.val_samples

    def every(self, interval: int) -> dict:
        """A round at every event for as long as the run lasts, scored on 4 examples, 16 variants a forward."""
        return {**super().every(interval), "alora": {"rounds": 10**6, "val_samples": 4, "variants_per_forward": 16}}


SPEC = ALoRASpec()
