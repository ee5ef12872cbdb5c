"""ds_dynrank: LoRA fine-tuning under DeepSpeed with ranks that can be re-allocated while training runs.

    dynrank = ds_dynrank.initialize(model, "ds_configs/zero2_l1ra.json", total_steps=1000)

The names below load on first use: `import ds_dynrank.config` (pydantic only) must not pull in torch,
transformers and DeepSpeed, so that a bad config is refused in a second, before any of them loads.
"""

from __future__ import annotations

from importlib import import_module

_EXPORTS = {
    "initialize": "ds_dynrank.api",
    "prepare": "ds_dynrank.api",
    "DynRank": "ds_dynrank.controller",
    "DynRankConfig": "ds_dynrank.config",
    "from_ds_config": "ds_dynrank.config",
    "load_ds_config": "ds_dynrank.config",
    "UserInputError": "ds_dynrank.errors",
    "inject_lora": "ds_dynrank.inject",
    "select_targets": "ds_dynrank.inject",
    "LoRALinear": "ds_dynrank.lora",
    "iter_lora": "ds_dynrank.lora",
    "DynRankTrainer": "ds_dynrank.hf",
    "DynRankSFTTrainer": "ds_dynrank.sft_trainer",
    "MethodSpec": "ds_dynrank.methods.spec",
    "register_method": "ds_dynrank.methods.registry",
}
_RENAMED = {"register_method": "register"}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), _RENAMED.get(name, name))
    raise AttributeError(f"module 'ds_dynrank' has no attribute {name!r}")
