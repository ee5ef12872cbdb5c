"""One rank of the scores check (run by tests/e2e/test_trl_trainer.py under torchrun, 2 processes): does AdaLoRA's
allocation see the gradients under accelerate's combined backward-and-step?

The same run twice in one process. First TRL's SFTTrainer (DynRankSFTTrainer, ZeRO-2, accelerate's DeepSpeed
wrapper runs backward and step in one call); it records the adapters as initialised, every micro-batch it trains
on and the scores at every event. Then our own loop (`prepare`, `deepspeed.initialize`, `DynRank`, explicit
backward/step/after_step) from the same adapters on the same batches with Trainer's optimizer and loss (TRL's
fused LM head). Each rank writes both runs' scores and allocation histories to `<out>/scores_rank<N>.pt`; the test
compares them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

STEPS = 10
DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 1,
    "gradient_clipping": 1.0,
    "steps_per_print": 10**9,
    "zero_optimization": {"stage": 2, "reduce_bucket_size": 10**6},
    "dynrank": {
        "method": "adalora",
        "target_modules": "all-linear",
        "r": 4,
        "lora_alpha": 8,
        "adalora": {"target_r": 2, "tinit": 2, "tfinal": 2, "delta_t": 2},
    },
}


def recorder(method, into: list) -> None:
    """Wrap the method's scoring so every event's scores are kept."""
    scores = method.scores

    def recorded(ctx, adapters):
        out = scores(ctx, adapters)
        into.append(out.detach().clone())
        return out

    method.scores = recorded


def trainer_run(model_dir: str, data: str, out: Path):
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig

    from ds_dynrank import DynRankSFTTrainer

    class Recording(DynRankSFTTrainer):
        batches: list = []

        def training_step(self, model, inputs, num_items_in_batch=None):
            kept = {k: v.detach().clone() for k, v in inputs.items()}
            self.batches.append((kept, num_items_in_batch))
            return super().training_step(model, inputs, num_items_in_batch)

    config = SFTConfig(
        output_dir=str(out / "trainer"),
        deepspeed=DS_CONFIG,
        max_steps=STEPS,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        max_length=128,
        bf16=False,
        gradient_checkpointing=False,
        average_tokens_across_devices=False,  # each rank's own mean, as our loop computes it
        save_strategy="no",
        report_to=[],
        logging_steps=100,
        use_cpu=True,
        seed=0,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = Recording(model=model, args=config, train_dataset=load_dataset("json", data_files=data, split="train"))
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    scores: list = []
    recorder(trainer.dynrank_setup.method, scores)
    trainer.train()
    return initial, trainer.batches, scores, trainer


def own_loop(model_dir: str, initial: dict, batches: list, trainer):
    """Our loop, with the trainer's optimizer and its loss function (TRL's fused LM head) over a fresh engine."""
    import deepspeed
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from ds_dynrank.api import prepare
    from ds_dynrank.config import from_ds_config
    from ds_dynrank.controller import DynRank

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))  # as SFTTrainer patches its model
    setup = prepare(model, from_ds_config(DS_CONFIG), ds_config=DS_CONFIG)
    trainable = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in initial.items():
            trainable[name].copy_(value)  # the adapters exactly as the trainer's run began
    config = {k: v for k, v in DS_CONFIG.items() if k != "dynrank"}
    optimizer = trainer.new_optimizer(setup.optimizer_groups())
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    dynrank = DynRank(engine, setup, total_steps=STEPS)
    scores: list = []
    recorder(setup.method, scores)
    for inputs, num_items in batches:
        engine = dynrank.engine
        engine.train()
        loss = trainer.compute_loss(engine, dict(inputs), num_items_in_batch=num_items)
        engine.backward(loss)
        engine.step()
        dynrank.after_step()
    return scores, dynrank.history


def main() -> None:
    model_dir, data, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    from ds_dynrank import dist

    initial, batches, trainer_scores, trainer = trainer_run(model_dir, data, out)
    trainer_history = trainer.dynrank.history
    loop_scores, loop_history = own_loop(model_dir, initial, batches, trainer)
    torch.save(
        {
            "batches": len(batches),
            "trainer": {"scores": trainer_scores, "history": trainer_history},
            "own_loop": {"scores": loop_scores, "history": loop_history},
        },
        out / f"scores_rank{dist.rank()}.pt",
    )


if __name__ == "__main__":
    main()
