"""HF Trainer integration: the same engine hook, driven by Trainer's callbacks.

    trainer = DynRankTrainer(model=model, args=TrainingArguments(deepspeed="ds_configs/hf_zero2_l1ra.json", ...),
                             train_dataset=...)        # model: adapters already injected with inject_lora
    trainer.train()

`DynRankTrainer` builds the optimizer from the method's groups (L1RA's gates train at their own constant learning
rate), so the DeepSpeed config must leave `optimizer` out and let Trainer create it. Its callback attaches
`DynRank` to Trainer's DeepSpeed engine when training begins and calls `after_step()` at every optimizer step.
Only the masked backend runs under Trainer: Trainer keeps references to its engine, which the physical backend
would replace.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from ds_dynrank.config import DynRankConfig, from_ds_config, load_ds_config
from ds_dynrank.errors import UserInputError
from ds_dynrank.hook import DynRank, optimizer_groups
from ds_dynrank.lora import iter_lora


class DynRankCallback(TrainerCallback):
    """Drives DynRank from Trainer: attach at train begin, after_step() at every optimizer step."""

    def __init__(self, trainer: Trainer, cfg: DynRankConfig, validation: dict | None = None) -> None:
        self.trainer, self.cfg, self.validation, self.dynrank = trainer, cfg, validation, None

    def on_train_begin(self, args, state, control, **kwargs):
        engine = self.trainer.model_wrapped
        if not hasattr(engine, "zero_optimization_stage"):
            raise UserInputError("dynrank: DynRankTrainer needs TrainingArguments(deepspeed=...)")
        self.dynrank = DynRank(engine, self.cfg, iter_lora(engine.module), total_steps=state.max_steps,
                               output_dir=Path(args.output_dir), validation=self.validation)  # fmt: skip

    def on_step_end(self, args, state, control, **kwargs):
        self.dynrank.after_step()


class DynRankTrainer(Trainer):
    """Trainer whose optimizer has the method's param groups and whose loop drives DynRank."""

    def __init__(self, *args, dynrank_validation: dict | None = None, **kwargs) -> None:
        """`dynrank_validation`: ALoRA's fixed scoring batch (input_ids, attention_mask, labels), the same on every
        rank."""
        super().__init__(*args, **kwargs)
        ds = self.args.deepspeed
        raw = load_ds_config(ds) if isinstance(ds, str | Path) else dict(ds or {})
        self.dynrank_config = from_ds_config(raw)
        if "optimizer" in raw:
            raise UserInputError("dynrank: with DynRankTrainer leave 'optimizer' out of the DeepSpeed config "
                                 "(Trainer builds it with the method's param groups)")  # fmt: skip
        if self.dynrank_config.dynamic and self.dynrank_config.reshape.backend != "masked":
            raise UserInputError("dynrank.reshape.backend: only 'masked' runs under HF Trainer")
        if self.dynrank_config.method == "alora" and dynrank_validation is None:
            raise UserInputError("dynrank.method: 'alora' scores ranks on a validation batch: pass "
                                 "DynRankTrainer(..., dynrank_validation=batch)")  # fmt: skip
        if self.dynrank_config.method == "modalloc" and self.args.weight_decay:
            raise UserInputError(f"weight_decay: {self.args.weight_decay} would shrink the adapters of inactive "
                                 "modules under dynrank method 'modalloc' (masked backend); set it to 0")  # fmt: skip
        self.dynrank_callback = DynRankCallback(self, self.dynrank_config, dynrank_validation)
        self.add_callback(self.dynrank_callback)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            groups = optimizer_groups(self.dynrank_config, iter_lora(model or self.model))
            for group in groups:
                group.setdefault("weight_decay", self.args.weight_decay)
            self.optimizer = torch.optim.AdamW(groups, lr=self.args.learning_rate,
                                               betas=(self.args.adam_beta1, self.args.adam_beta2),
                                               eps=self.args.adam_epsilon)  # fmt: skip
        return self.optimizer

    @property
    def dynrank(self) -> DynRank | None:
        return self.dynrank_callback.dynrank
