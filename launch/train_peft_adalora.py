"""The outside peer: PEFT's own AdaLoRA (`AdaLoraConfig`) on the same task, data, steps and evaluation as
launch/train.py, driven the way PEFT requires.

    deepspeed --num_gpus 2 launch/train_peft_adalora.py --deepspeed ds_configs/zero0_peft_adalora.json

`update_and_allocate(global_step)` runs at every optimizer step, after the gradients are reduced and before the
step. It runs under ZeRO-0, the one stage where PEFT's masking holds: ZeRO-0 in fp32 keeps no separate master
weights, and its gradients are all-reduced in `engine.backward`, so every rank masks alike. Under ZeRO 1-3,
`masked_fill_` edits only the working copy, and the optimizer's fp32 master restores the pruned values at the next
step. The run writes the same `metrics.json` as launch/train.py, plus `allocation.json` (the rank per module PEFT's
final mask keeps).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ds_dynrank.errors import UserInputError  # noqa: E402
from ds_dynrank.task.job import run_main  # noqa: E402


def peft_config_from(section: dict, total_steps: int):
    """AdaLoraConfig from the `"peft_adalora"` section (PEFT's own field names). Defaults follow our AdaLoRA-style
    config: init_r 12 -> target_r 8, tinit 10%, tfinal 20%, deltaT 1% of the run."""
    from peft import AdaLoraConfig

    fields = {
        "init_r": 12,
        "target_r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "beta1": 0.85,
        "beta2": 0.85,
        "orth_reg_weight": 0.5,
        "tinit": round(0.1 * total_steps),
        "tfinal": round(0.2 * total_steps),
        "deltaT": max(1, round(0.01 * total_steps)),
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    }
    unknown = set(section) - set(fields)
    if unknown:
        raise UserInputError(f"peft_adalora: unknown key(s) {sorted(unknown)} (known: {', '.join(sorted(fields))})")
    fields.update({k: v for k, v in section.items() if v is not None})  # null: keep the default
    try:
        return AdaLoraConfig(task_type="CAUSAL_LM", total_step=total_steps, **fields)
    except (ValueError, TypeError) as err:
        raise UserInputError(f"peft_adalora: {err}") from None


def train(args) -> dict:
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from peft import get_peft_model
    from transformers import set_seed

    from ds_dynrank import dist
    from ds_dynrank.config import load_ds_config
    from ds_dynrank.ds_config import bf16_available, resolve
    from ds_dynrank.rundir import RunDir
    from ds_dynrank.task import job
    from ds_dynrank.task.models import load_model_and_tokenizer
    from ds_dynrank.task.runtime import local_world_size, share_cpu_threads

    raw = load_ds_config(args.deepspeed)
    stage = (raw.get("zero_optimization") or {}).get("stage", 0)
    if stage != 0:
        raise UserInputError(f"zero_optimization.stage: PEFT's AdaLoRA masks only hold under ZeRO-0, got {stage}")
    peft_cfg = peft_config_from(raw.pop("peft_adalora", {}), args.max_steps)
    raw.pop("dynrank", None)
    set_seed(args.seed)
    model, tokenizer = load_model_and_tokenizer(args.model)
    job.apply_gradient_checkpointing(model, args)
    data = job.build_data(args, tokenizer)
    model = get_peft_model(model, peft_cfg)
    dist.init(timeout_s=args.dist_timeout)
    run = RunDir(job.shared_output_dir(args, prefix="peft_adalora_"))
    accel = get_accelerator()
    share_cpu_threads(accel.device_name(), local_world_size(dist.world_size()))
    ds_config = resolve(raw, max_steps=args.max_steps, output_dir=run.path, bf16_supported=bf16_available(accel))
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_config)
    baseline, final, history, seconds = job.train_peer(  # update_and_allocate: reduced grads, before the step
        engine, data, args, desc="train (PEFT AdaLoRA)", before_step=model.base_model.update_and_allocate
    )
    pattern = peft_cfg.rank_pattern or {}
    ranks = {module_name(name): int(sum(mask)) for name, mask in pattern.items()}
    metrics = job.peer_metrics(
        data,
        engine,
        baseline,
        final,
        history,
        seconds,
        trainable_parameters=sum(p.numel() for p in trainable),
        zero_stage=0,
        method="peft-adalora",
        final_budget=sum(ranks.values()),
        budget_unit="rank",
    )
    if dist.is_main():
        job.write_results(run, data, metrics)
        run.write_ranks(ranks)
        print(
            f"{job.summary(data, baseline, final)} after {engine.global_steps} steps; final rank budget "
            f"{sum(ranks.values())}; outputs in {run.path}"
        )
    dist.barrier()
    return metrics


def module_name(pattern_key: str) -> str:
    """PEFT's rank_pattern key ("base_model.model.<module>.lora_E.<adapter>") as the module name our runs use."""
    name = pattern_key.removeprefix("base_model.model.")
    return name[: name.index(".lora_E")] if ".lora_E" in name else name


if __name__ == "__main__":
    sys.exit(run_main(train, None, __doc__.split("\n\n")[0]))
