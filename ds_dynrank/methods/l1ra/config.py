"""L1RA's knobs and its spec (pydantic only)."""

from __future__ import annotations

from pydantic import Field

from ds_dynrank.methods.spec import MethodSpec
from ds_dynrank.section import Section


class L1RAConfig(Section):
    l1_lambda: float = Field(0.005, ge=0)
    """L1 strength on the gates, applied as a proximal step decoupled from Adam (paper configs: 0.005)."""

    gate_lr: float = Field(0.02, gt=0)
    """Constant learning rate of the gate vectors, for Adam and for the proximal step (paper configs: 0.02)."""

    threshold: float | None = Field(None, ge=0)
    """A live rank whose gate is below this is pruned at an event. Default: gate_lr x l1_lambda + 1e-6, i.e.
    less than one L1 step from zero (the reference code's rule)."""

    exclude_pruned: bool = True
    """Freed ranks go first to modules that pruned nothing in this event (the reference code's rule)."""

    @property
    def prune_threshold(self) -> float:
        return self.threshold if self.threshold is not None else self.gate_lr * self.l1_lambda + 1e-6


class L1RASpec(MethodSpec):
    name = "l1ra"
    summary = "gates under an L1 penalty, ranks whose gate reaches zero pruned and re-assigned (arXiv 2509.04884)."
    implementation = "ds_dynrank.methods.l1ra.method:L1RA"
    section = L1RAConfig
    section_doc = "L1RA's knobs (method `l1ra`)."
    gate = True
    grows = True

    def check(self, cfg) -> None:
        if cfg.gate is False:
            raise ValueError("gate: method l1ra needs gate: true (or leave gate unset)")

    def every(self, interval: int) -> dict:
        """Strong enough a pull that gates reach zero and ranks move within a few events."""
        return {**super().every(interval), "l1ra": {"l1_lambda": 0.5, "gate_lr": 0.1}}


SPEC = L1RASpec()
