"""HF Trainer and TRL integration: the same controller, driven by Trainer's callbacks, saved and resumed with
Trainer's own checkpoints.

    trainer = DynRankTrainer(model=model, args=TrainingArguments(deepspeed="ds_configs/hf_zero2_l1ra.json", ...),
                             train_dataset=...)   # adapters are injected from the config's "dynrank" section
    trainer.train()                                # or trainer.train(resume_from_checkpoint=True)

`DynRankTrainerMixin` holds all of it, so that `DynRankTrainer` (HF `Trainer`) and `DynRankSFTTrainer` (TRL's
`SFTTrainer`, ds_dynrank/sft_trainer.py) are one implementation. The DeepSpeed config comes from
`TrainingArguments(deepspeed=...)` or from accelerate's DeepSpeed plugin (`accelerate launch --config_file`), and
must leave `optimizer` out: the trainer builds it from the method's param groups (L1RA's gates train at their own
learning rate). The callback builds the controller over the trainer's engine when training begins and calls
`after_step()` at every optimizer step. Accelerate runs `engine.backward()` and `engine.step()` in one call, so no
callback sees gradients; our methods read them through tensor hooks during backward and do not need to.

A checkpoint holds what the model source cannot give back: the adapters (as a PEFT adapter directory, as Trainer
writes for a PEFT model), DeepSpeed's state without the frozen base, and the controller's state and allocation.
A physical event replaces the engine: the engine object Trainer, accelerate and the training loop hold then takes
on the new engine's state, and accelerate's optimizer wrapper (which Trainer's LR scheduler drives) wraps the new
optimizer, so nothing keeps driving, or keeps alive, the old one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ds_dynrank.api import Setup, prepare
from ds_dynrank.config import check_deepspeed_compat, from_ds_config, load_ds_config
from ds_dynrank.controller import DynRank
from ds_dynrank.errors import UserInputError
from ds_dynrank.lora import adapter_state_tensors, ranks_by_name
from ds_dynrank.recompute import check_supported
from ds_dynrank.rundir import temp_sibling, write_json
from ds_dynrank.zero.checkpoint import trainable_state_only

STATE_FILE = "dynrank_state.pt"
ALLOCATION_FILE = "dynrank_allocation.json"  # the adapters' shapes, read before any engine exists


class DynRankCallback(TrainerCallback):
    """Drives the controller from Trainer: built at train begin (restored when resuming), after_step() at every
    optimizer step."""

    def __init__(self, trainer: Trainer, setup: Setup) -> None:
        self.trainer, self.setup, self.dynrank, self.resume_from = trainer, setup, None, None

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        engine = trainer.model_wrapped  # a DeepSpeed engine: deepspeed_config_of() refused the trainer otherwise
        if self.setup.backend.swaps_engine:  # rebuild the engine as accelerate built it: Trainer's optimizer
            plugin = trainer.accelerator.state.deepspeed_plugin
            self.setup.backend.rebuild_with(plugin.deepspeed_config, trainer.new_optimizer)
        self.dynrank = DynRank(engine, self.setup, total_steps=state.max_steps, output_dir=args.output_dir)
        if self.resume_from is not None:  # DeepSpeed's engine and counters are restored already
            self.dynrank.load_state_dict(torch.load(Path(self.resume_from) / STATE_FILE, weights_only=False))

    def on_step_end(self, args, state, control, **kwargs):
        held = self.dynrank.engine
        self.dynrank.after_step()
        if self.dynrank.engine is not held:
            follow_engine(self.trainer, held, self.dynrank.engine)
            self.dynrank.attached.engine = held  # one object for all: the next event rebuilds this one again


def follow_engine(trainer: Trainer, held, new) -> None:
    """After a physical event: the engine object that Trainer (`model_wrapped`, `deepspeed`, the `model` of its
    running loop), accelerate (`deepspeed_engine_wrapped`, `_models`) and the callbacks hold becomes the new engine,
    by taking on its state; and accelerate's optimizer wrapper wraps the new optimizer. The loop's local `model`
    cannot be rebound from outside, so the object itself has to follow."""
    held.__dict__ = new.__dict__  # one state, two names: what either is asked reads and writes the new engine's
    trainer.optimizer.optimizer = new.optimizer  # Trainer's LR scheduler writes through this wrapper


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


def deepspeed_config_of(trainer: Trainer) -> dict:
    """The DeepSpeed config the trainer runs with: `TrainingArguments(deepspeed=...)`, or accelerate's plugin."""
    ds = trainer.args.deepspeed
    if ds:
        return load_ds_config(ds) if isinstance(ds, str | Path) else dict(ds)
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        raise UserInputError(
            'dynrank: the trainer runs without DeepSpeed, and the "dynrank" section lives in the DeepSpeed '
            "config: give TrainingArguments(deepspeed='ds_config.json') or launch with `accelerate launch "
            "--config_file` whose DeepSpeed plugin names it (deepspeed_config_file)"
        )
    return dict(plugin.deepspeed_config)


def validation_batch(trainer: Trainer, cfg) -> dict:
    """The scoring batch of methods that score on one (ALoRA): the first `validation_samples` rows of the
    trainer's eval_dataset (a validation split, never the test split), through the trainer's own collator, so every
    rank scores on the same batch and the allocation never looks at the training rows."""
    n, data = cfg.validation_samples, trainer.eval_dataset
    if isinstance(data, dict):
        data = next(iter(data.values()), None)
    if data is None or len(data) < n:
        have = "no eval_dataset" if data is None else f"an eval_dataset of {len(data)} rows"
        raise UserInputError(
            f"dynrank.{cfg.spec.validation_field}: method {cfg.method!r} scores ranks on {n} validation rows and the "
            f"trainer has {have}: give eval_dataset (a validation split) or dynrank_validation=batch"
        )
    batch = trainer.data_collator([data[i] for i in range(n)])
    return {k: batch[k] for k in ("input_ids", "attention_mask", "labels") if k in batch}


def final_state(trainer: Trainer) -> dict:
    """Collective: this rank's view of the trained adapters, to compare across ranks: the live rank of every
    module and a SHA-256 of every adapter tensor as this rank holds it (gathered under ZeRO-3)."""
    import hashlib

    from ds_dynrank.zero import working_copies

    adapters = trainer.dynrank.adapters
    digest = hashlib.sha256()
    for tensor in working_copies(adapter_state_tensors(adapters)):
        digest.update(tensor.numpy().tobytes())
    return {"ranks": ranks_by_name(adapters), "adapters_sha256": digest.hexdigest()}


class DynRankTrainerMixin:
    """Everything DynRankTrainer and DynRankSFTTrainer add to their trainer (list it first among the bases)."""

    def __init__(self, *args, dynrank_validation: dict | None = None, **kwargs) -> None:
        """`dynrank_validation`: the fixed scoring batch (input_ids, attention_mask, labels) of methods that score
        on one (ALoRA), the same on every rank; by default the first rows of `eval_dataset`."""
        super().__init__(*args, **kwargs)
        for name in ("activation_checkpointing", "gradient_checkpointing"):  # the second: the deprecated alias
            if getattr(self.args, name, None):
                check_supported(self.model, name)  # before training, not at Trainer's first step
                break
        raw = deepspeed_config_of(self)
        cfg = trainer_config(raw, self.args.weight_decay)
        if dynrank_validation is None and cfg.validation_samples:
            dynrank_validation = validation_batch(self, cfg)
        self.dynrank_setup = prepare(self.model, cfg, ds_config=raw, validation=dynrank_validation)
        self.dynrank_callback = DynRankCallback(self, self.dynrank_setup)
        self.add_callback(self.dynrank_callback)

    def new_optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        """Trainer's AdamW over the method's param groups (also what a physical event rebuilds the engine with)."""
        groups = [{"weight_decay": self.args.weight_decay, **group} for group in groups]
        return torch.optim.AdamW(
            groups,
            lr=self.args.learning_rate,
            betas=(self.args.adam_beta1, self.args.adam_beta2),
            eps=self.args.adam_epsilon,
        )

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self.optimizer = self.new_optimizer(self.dynrank_setup.optimizer_groups())
        return self.optimizer

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """Trainer's own train(); resuming also shapes the adapters as saved (before the engine exists) and
        restores the controller from the checkpoint's dynrank state."""
        path = resume_from_checkpoint
        if path is True:
            path = get_last_checkpoint(self.args.output_dir)
            if path is None:
                raise UserInputError(f"resume_from_checkpoint: no checkpoint-* folder in {self.args.output_dir}")
        if path:
            self._reshape_for(Path(path))
        self.dynrank_callback.resume_from = path or None
        return super().train(path or None, *args, **kwargs)

    def _reshape_for(self, folder: Path) -> None:
        for name in (STATE_FILE, ALLOCATION_FILE):
            if not (folder / name).is_file():
                raise UserInputError(
                    f"resume_from_checkpoint: {folder} holds no {name} (not written by a ds_dynrank trainer?)"
                )
        saved = json.loads((folder / ALLOCATION_FILE).read_text())
        setup = self.dynrank_setup
        mine = [name for name, _ in setup.adapters]
        if sorted(saved["ranks"]) != sorted(mine):
            raise UserInputError(f"resume_from_checkpoint: {folder} adapts other modules than this model and config")
        setup.adapters = setup.backend.resize_for_resume(self.model, setup.adapters, saved["ranks"], saved["active"])

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Not under DeepSpeed: the module state (without the frozen base) is loaded with the engine's below."""
        if not self.is_deepspeed_enabled:
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        """Trainer's, with DeepSpeed's checkpoint loaded non-strictly: it holds the trainable state alone."""
        from transformers.integrations.deepspeed import deepspeed_load_checkpoint

        model, loader = super()._prepare_for_training(max_steps, train_dataloader, None)
        if resume_from_checkpoint is not None:
            deepspeed_load_checkpoint(self.model_wrapped, resume_from_checkpoint, load_module_strict=False)
            self._load_optimizer_and_scheduler(resume_from_checkpoint)
            self._load_scaler(resume_from_checkpoint)
        return model, loader

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """DeepSpeed's state without the frozen base model (tied weights included), then Trainer's scheduler."""
        engine = self.model_wrapped
        with trainable_state_only(engine):
            engine.save_checkpoint(output_dir, exclude_frozen_parameters=True)
        from accelerate.utils import DeepSpeedSchedulerWrapper  # a config's own scheduler: saved by DeepSpeed
        from transformers.trainer import SCHEDULER_NAME

        if self.args.should_save and not isinstance(self.lr_scheduler, DeepSpeedSchedulerWrapper):
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The adapters as a stock PEFT adapter directory (live ranks only), as Trainer saves a PEFT model, and the
        tokenizer; the frozen base stays where it came from. Collective under DeepSpeed."""
        out = Path(output_dir or self.args.output_dir)
        if self.dynrank is None:  # before training: nothing of ours to write yet
            return super().save_model(str(out), _internal_call)
        staging = temp_sibling(out / "adapter", directory=True)
        try:
            self.dynrank.export_adapter(staging)
            if self.args.should_save:
                for item in staging.iterdir():
                    os.replace(item, out / item.name)
                if self.processing_class is not None:
                    self.processing_class.save_pretrained(str(out))
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _save_checkpoint(self, model, trial) -> None:
        """Trainer's checkpoint, plus the controller's state and the adapters' shapes in the same folder."""
        super()._save_checkpoint(model, trial)
        if self.dynrank is not None and self.args.should_save:
            folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            tmp = folder / f".{STATE_FILE}.tmp"
            torch.save(self.dynrank.state_dict(), tmp)
            os.replace(tmp, folder / STATE_FILE)
            write_json(folder / ALLOCATION_FILE, self.dynrank.checkpoint_meta())

    @property
    def dynrank(self) -> DynRank | None:
        return self.dynrank_callback.dynrank


class DynRankTrainer(DynRankTrainerMixin, Trainer):
    """HF Trainer whose optimizer has the method's param groups and whose loop drives the controller."""
