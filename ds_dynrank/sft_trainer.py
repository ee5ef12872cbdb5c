"""TRL's `SFTTrainer` with dynamic rank: TRL's datasets (`messages` with the chat template, `prompt`/`completion`
with the loss on completions, `text`), its `SFTConfig` and its launchers, with our adapters, method and controller.

    trainer = DynRankSFTTrainer(model="HuggingFaceTB/SmolLM2-135M-Instruct", args=SFTConfig(...),
                                train_dataset=dataset)   # DeepSpeed from SFTConfig(deepspeed=...) or accelerate
    trainer.train()

Everything but TRL's own part is `DynRankTrainerMixin` (ds_dynrank/hf.py), shared with `DynRankTrainer`. TRL is an
optional dependency (`pip install trl`); importing this module without it says so.
"""

from __future__ import annotations

from ds_dynrank.errors import UserInputError
from ds_dynrank.hf import DynRankTrainerMixin

try:
    from trl import SFTTrainer
except ImportError as err:  # pragma: no cover - exercised only without trl
    raise ImportError("DynRankSFTTrainer needs TRL: pip install 'trl>=1.16,<2'") from err


class DynRankSFTTrainer(DynRankTrainerMixin, SFTTrainer):
    """SFTTrainer whose LoRA adapters are ours: injected from the DeepSpeed config's "dynrank" section, their
    ranks re-allocated while training runs."""

    def __init__(self, *args, **kwargs) -> None:
        if kwargs.get("peft_config") is not None:
            raise UserInputError(
                "peft_config: DynRankSFTTrainer injects its own LoRA adapters from the DeepSpeed config's "
                '"dynrank" section (target_modules, r, lora_alpha, ...); leave peft_config out'
            )
        super().__init__(*args, **kwargs)
