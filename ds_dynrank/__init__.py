"""ds_dynrank: LoRA fine-tuning under DeepSpeed with ranks that can be re-allocated while training runs.

The names below load on first use: `import ds_dynrank.config` (pydantic only) must not pull in torch,
transformers and DeepSpeed, so that a bad config is refused in a second, before any of them loads.
"""

from __future__ import annotations

from importlib import import_module

_EXPORTS = {
    "DynRankConfig": "ds_dynrank.config",
    "from_ds_config": "ds_dynrank.config",
    "load_ds_config": "ds_dynrank.config",
    "UserInputError": "ds_dynrank.errors",
    "inject_lora": "ds_dynrank.inject",
    "select_targets": "ds_dynrank.inject",
    "LoRALinear": "ds_dynrank.lora",
    "iter_lora": "ds_dynrank.lora",
    "lora_parameters": "ds_dynrank.lora",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ds_dynrank' has no attribute {name!r}")
