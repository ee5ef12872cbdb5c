"""ds_dynrank: LoRA fine-tuning under DeepSpeed with ranks that can be re-allocated while training runs."""

from ds_dynrank.config import DynRankConfig, from_ds_config, load_ds_config
from ds_dynrank.errors import UserInputError
from ds_dynrank.inject import inject_lora, select_targets
from ds_dynrank.lora import LoRALinear, iter_lora, lora_parameters

__all__ = [
    "DynRankConfig",
    "LoRALinear",
    "UserInputError",
    "from_ds_config",
    "inject_lora",
    "iter_lora",
    "load_ds_config",
    "lora_parameters",
    "select_targets",
]
__version__ = "0.1.0"
