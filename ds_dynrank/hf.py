"""HF Trainer integration: the same controller, driven by Trainer's callbacks, saved and resumed with Trainer's own
checkpoints.

    trainer = DynRankTrainer(model=model, args=TrainingArguments(deepspeed="ds_configs/hf_zero2_l1ra.json", ...),
                             train_dataset=...)   # adapters are injected from the config's "dynrank" section
    trainer.train()                                # or trainer.train(resume_from_checkpoint=True)

`DynRankTrainer` builds the optimizer from the method's groups (L1RA's gates train at their own constant learning
rate), so the DeepSpeed config must leave `optimizer` out and let Trainer create it. Its callback builds the
controller over Trainer's DeepSpeed engine when training begins and calls `after_step()` at every optimizer step;
every checkpoint Trainer writes carries the controller's state (`dynrank_state.pt`), and resuming restores it.
Only a backend that keeps the engine runs under Trainer (masked): Trainer and accelerate hold references to the
engine, which the physical backend replaces at its events.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ds_dynrank.api import Setup, prepare
from ds_dynrank.config import check_deepspeed_compat, from_ds_config, load_ds_config
from ds_dynrank.controller import DynRank
from ds_dynrank.errors import UserInputError
from ds_dynrank.recompute import check_supported

STATE_FILE = "dynrank_state.pt"


class DynRankCallback(TrainerCallback):
    """Drives the controller from Trainer: built at train begin (restored when resuming), after_step() at every
    optimizer step."""

    def __init__(self, trainer: Trainer, setup: Setup) -> None:
        self.trainer, self.setup, self.dynrank, self.resume_from = trainer, setup, None, None

    def on_train_begin(self, args, state, control, **kwargs):
        engine = self.trainer.model_wrapped
        if not hasattr(engine, "zero_optimization_stage"):
            raise UserInputError("dynrank: DynRankTrainer needs TrainingArguments(deepspeed=...)")
        self.dynrank = DynRank(engine, self.setup, total_steps=state.max_steps, output_dir=args.output_dir)
        if self.resume_from is not None:  # DeepSpeed's engine and counters are restored already
            path = Path(self.resume_from) / STATE_FILE
            if not path.is_file():
                raise UserInputError(
                    f"resume_from_checkpoint: {path.parent} holds no {STATE_FILE} (not written by DynRankTrainer?)"
                )
            self.dynrank.load_state_dict(torch.load(path, weights_only=False))

    def on_step_end(self, args, state, control, **kwargs):
        self.dynrank.after_step()


def trainer_config(raw: dict, weight_decay: float):
    """The validated section of a DeepSpeed config for DynRankTrainer, or the refusal: the optimizer is Trainer's
    (so it must be left out, and its weight decay suit the method), the ZeRO settings as for any engine."""
    cfg = from_ds_config(raw)
    if "optimizer" in raw:
        raise UserInputError(
            "dynrank: with DynRankTrainer leave 'optimizer' out of the DeepSpeed config "
            "(Trainer builds it with the method's param groups)"
        )
    problem = cfg.spec.weight_decay_problem(cfg, weight_decay)
    if problem:
        raise UserInputError(f"weight_decay: {problem}")
    check_deepspeed_compat(cfg, raw)
    return cfg


class DynRankTrainer(Trainer):
    """Trainer whose optimizer has the method's param groups and whose loop drives the controller."""

    def __init__(self, *args, dynrank_validation: dict | None = None, **kwargs) -> None:
        """`dynrank_validation`: the fixed scoring batch (input_ids, attention_mask, labels) of methods that score
        on one (ALoRA), the same on every rank."""
        super().__init__(*args, **kwargs)
        ds = self.args.deepspeed
        raw = load_ds_config(ds) if isinstance(ds, str | Path) else dict(ds or {})
        cfg = trainer_config(raw, self.args.weight_decay)
        for name in ("activation_checkpointing", "gradient_checkpointing"):  # the second: the deprecated alias
            if getattr(self.args, name, None):
                check_supported(self.model, name)  # before training, not at Trainer's first step
                break
        self.dynrank_setup = prepare(self.model, cfg, ds_config=raw, validation=dynrank_validation)
        if self.dynrank_setup.backend.swaps_engine:
            raise UserInputError(
                f"dynrank.reshape.backend: {cfg.reshape.backend!r} replaces the engine at its "
                "events, which HF Trainer holds; only 'masked' runs under HF Trainer"
            )
        self.dynrank_callback = DynRankCallback(self, self.dynrank_setup)
        self.add_callback(self.dynrank_callback)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            groups = self.dynrank_setup.optimizer_groups()
            for group in groups:
                group.setdefault("weight_decay", self.args.weight_decay)
            self.optimizer = torch.optim.AdamW(
                groups,
                lr=self.args.learning_rate,
                betas=(self.args.adam_beta1, self.args.adam_beta2),
                eps=self.args.adam_epsilon,
            )
        return self.optimizer

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """Trainer's own train(); resuming also restores the controller from the checkpoint's dynrank state."""
        path = resume_from_checkpoint
        if path is True:
            path = get_last_checkpoint(self.args.output_dir)
        self.dynrank_callback.resume_from = path or None
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _save_checkpoint(self, model, trial) -> None:
        """Trainer's checkpoint, plus the controller's state in the same folder (one copy: every rank holds it)."""
        super()._save_checkpoint(model, trial)
        if self.dynrank is not None and self.args.should_save:
            folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            tmp = folder / f".{STATE_FILE}.tmp"
            torch.save(self.dynrank.state_dict(), tmp)
            os.replace(tmp, folder / STATE_FILE)

    @property
    def dynrank(self) -> DynRank | None:
        return self.dynrank_callback.dynrank
