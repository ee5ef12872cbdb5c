"""What a method is to the config and the front door, without torch: its name, its own section of knobs, the
defaults it implies and the rules it adds. The torch side (`implementation`) is imported only when a run builds it.

A method's folder holds `config.py` (its Section and its MethodSpec, pydantic only) and `method.py` (the Method);
`ds_dynrank/methods/registry.py` lists the specs. Nothing outside the folder asks for a method by name.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from ds_dynrank.section import Section


class MethodSpec:
    """Override the attributes and hooks a method needs; the defaults describe a dynamic method with no knobs."""

    name: str = ""
    summary: str = ""  # one sentence: the `method` field's documentation of this method
    implementation: str = ""  # "package.module:Class" of the Method
    section: type[Section] | None = None  # its own knobs, `dynrank.<name>`, allowed with this method only
    section_doc: str = ""  # the documentation of that field
    dynamic: bool = True  # does it ever re-allocate (schedule, budget and reshape apply)
    gate: bool = False  # the default of `dynrank.gate`
    grows: bool = False  # can a module's rank rise above its initial rank (the masked backend keeps spare slots)
    validation_field: str = ""  # the field of its section that sizes its scoring batch (see validation_samples)
    budget_unit: str = "rank"  # the default of `dynrank.budget.unit`
    uses: tuple[str, ...] = ()  # other methods whose sections this one reads (a combination: gora_l1ra)

    def check(self, cfg: Any) -> None:
        """Rules across the whole section that this method adds, raised as ValueError naming the field."""

    def weight_decay_problem(self, cfg: Any, decay: float) -> str | None:
        """Why decoupled weight decay `decay` cannot run with this method and config (None: it can)."""
        return None

    def validation_samples(self, cfg: Any) -> int:
        """Training examples the method scores on, held out of training by the job (0: none)."""
        return 0

    def every(self, interval: int) -> dict:
        """Overrides of the section that make the method act every `interval` steps (cost benchmarks)."""
        return {"schedule": {"start": interval, "interval": interval}} if self.dynamic else {}

    def load(self) -> type:
        """The Method class (imports torch)."""
        module, _, attr = self.implementation.partition(":")
        return getattr(import_module(module), attr)
