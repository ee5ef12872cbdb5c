"""Fixed-rank LoRA's spec: no knobs, never re-allocates, and the Method protocol's defaults are all it does."""

from __future__ import annotations

from ds_dynrank.methods.spec import MethodSpec


class LoRASpec(MethodSpec):
    name = "lora"
    summary = "fixed-rank LoRA (the baseline every dynamic method is measured against)."
    implementation = "ds_dynrank.methods.base:Method"
    dynamic = False


SPEC = LoRASpec()
